"""Content keys: a stable hash of exactly the config fields a stage depends on plus its parents' keys."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

KEY_LENGTH = 16


def _normalise(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            return repr(obj)
        # 1.0 and 1 hash the same; floats otherwise keep full precision
        return int(obj) if obj.is_integer() else float(repr(obj))
    raise TypeError(f"cannot hash config value of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, tuples as lists, integral floats as ints."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _drop_none(obj: Any) -> Any:
    """Dict entries whose value is None removed, recursively (list items are kept as they are)."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def content_key(stage: str, config: dict, parents: dict[str, str], version: int = 1) -> str:
    """Hex key of a stage instance: sha256 over (stage, stage code version, config, parent keys).

    Config entries whose value is None are left out, so adding an optional field (default None) to a
    config class keeps every existing key, and finished artifacts, valid. None and "absent" mean the
    same everywhere in the configs; a field whose default is not None and that is set to None still
    changes the key (its default value is then missing from the hashed dict).
    """
    payload = canonical_json({"stage": stage, "version": version, "config": _drop_none(config), "parents": parents})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]

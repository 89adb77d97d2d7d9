"""Reading and writing model checkpoints, including the community model-inversion files.

Accepted top levels (see ``shared/manifests/README.md``):

* a raw state_dict (``{name: Tensor}``), e.g. the Diff-MI U-Net ``ema_0.9999_XXXXXX.pt``;
* ``{'state_dict': {...}}``, e.g. KED-MI / GMI ``VGG16_88.26.tar`` (keys prefixed ``module.``);
* ``{'model': {...}, 'opt': {...}}``, e.g. PLG-MI ``gen_latest.pth.tar``;
* any dict holding the state_dict under another key, selected with ``key=``.

Files are read with ``torch.load(weights_only=True)``: a file that needs pickled Python code (a
whole pickled ``nn.Module``, custom classes) is refused with a :class:`UserError`, never executed.
A ``module.`` prefix (DataParallel / DDP) or ``_orig_mod.`` prefix (``torch.compile``) shared by every
key is stripped.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffmi_ray.errors import UserError

#: keys tried, in this order, when a checkpoint's top level is a wrapper dict and ``key`` is not given
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
#: prefixes stripped when every key of a state_dict carries them (repeatedly, e.g. ``module.module.``)
STRIP_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending keys an error message lists per category


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def strip_prefix(sd: Mapping[str, Tensor], prefixes: tuple[str, ...] = STRIP_PREFIXES) -> dict[str, Tensor]:
    """Remove a prefix from every key if *all* keys carry it; repeated until no prefix is shared."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    return out


def extract_state_dict(obj: Any, *, key: str | None = None, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state_dict inside a loaded checkpoint object (see the module docstring for the formats).

    ``key``: take ``obj[key]`` (nested keys as ``'a.b'`` are not interpreted). Otherwise a raw
    state_dict is returned as is and a wrapper dict is searched for :data:`STATE_DICT_KEYS`.
    Prefixes in :data:`STRIP_PREFIXES` are removed. ``source`` names the file in error messages.
    """
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(map(str, obj.keys()))[:20] if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(f"{source}: no top-level key {key!r} in the checkpoint (it has: {have})")
        inner = obj[key]
        if not _is_state_dict(inner):
            raise UserError(f"{source}: {key!r} does not hold a state_dict (name -> tensor mapping), "
                            f"got {type(inner).__name__}")
        return strip_prefix(inner)
    if _is_state_dict(obj):
        return strip_prefix(obj)
    if isinstance(obj, Mapping):
        for k in STATE_DICT_KEYS:
            if k in obj and _is_state_dict(obj[k]):
                return strip_prefix(obj[k])
        raise UserError(f"{source}: cannot find a state_dict in the checkpoint; its top-level keys are "
                        f"{sorted(map(str, obj.keys()))[:20]} (tried {list(STATE_DICT_KEYS)}); pass key=... "
                        f"to name the one that holds the weights")
    raise UserError(f"{source}: the checkpoint holds a {type(obj).__name__}, not a state_dict or a dict "
                    f"containing one")


def load_state_dict_file(path: str | os.PathLike, *, key: str | None = None,
                         map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a checkpoint file safely and return its bare state_dict ``{name: Tensor}``.

    Raises UserError if the file is missing, unreadable, needs pickled code (weights_only refusal),
    or holds no recognisable state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: refusing to load: the file needs pickled Python code to be unpickled "
            f"(torch.load(weights_only=True) failed: {first}). Only plain tensors/dicts are loaded, so "
            f"arbitrary code in a checkpoint is never run. If you trust the file, re-save its weights as "
            f"a plain state_dict, e.g. torch.save(obj.state_dict(), 'weights.pt') in the code base that "
            f"wrote it.") from e
    except Exception as e:  # truncated / not a torch file / unsupported format
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return extract_state_dict(obj, key=key, source=str(path))


@dataclass
class LoadReport:
    """Key comparison of a state_dict against a model.

    missing: model keys absent from the file; unexpected: file keys the model lacks;
    mismatched: (key, file shape, model shape) for keys present in both with different shapes.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, show: int = _SHOW) -> str:
        parts = []
        for label, items in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected)):
            if items:
                more = f" (+{len(items) - show} more)" if len(items) > show else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:show])}{more}")
        if self.mismatched:
            more = f" (+{len(self.mismatched) - show} more)" if len(self.mismatched) > show else ""
            shown = ", ".join(f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:show])
            parts.append(f"{len(self.mismatched)} with a different shape: {shown}{more}")
        return "; ".join(parts) if parts else "all keys match"


def compare_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> LoadReport:
    """Compare ``sd`` with ``model.state_dict()`` (names and shapes).

    A missing BatchNorm ``num_batches_tracked`` counter is not reported: files written before
    PyTorch 0.4.1 lack it and BatchNorm fills it in.
    """
    own = model.state_dict()
    rep = LoadReport()
    rep.missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    rep.unexpected = [k for k in sd if k not in own]
    rep.mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                      if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return rep


def _unwrap(model: nn.Module) -> nn.Module:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def load_into(model: nn.Module, path: str | os.PathLike, *, strict: bool = True, key: str | None = None,
              map_location: str | torch.device = "cpu") -> LoadReport:
    """Load the checkpoint at ``path`` into ``model`` (a bare module or a DataParallel/DDP wrapper).

    strict=True: any missing, unexpected or shape-mismatched key raises a UserError naming the file
    and the first few offending keys of each kind; nothing is loaded then. strict=False: the tensors
    whose name and shape match are loaded, the rest is reported in the returned :class:`LoadReport`.
    Tensors are cast to the model's dtype and device by ``load_state_dict``.
    """
    sd = load_state_dict_file(path, key=key, map_location=map_location)
    target = _unwrap(model)
    rep = compare_state_dict(target, sd)
    if strict and not rep.ok:
        raise UserError(f"{path}: does not fit {type(target).__name__}: {rep.describe()}")
    bad = {k for k, _, _ in rep.mismatched} | set(rep.unexpected)
    target.load_state_dict({k: v for k, v in sd.items() if k not in bad}, strict=False)
    return rep


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically: write a temp file in the same folder, fsync, ``os.replace``.

    Readers never see a half-written file. Parent folders are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


__all__ = ["STATE_DICT_KEYS", "STRIP_PREFIXES", "LoadReport", "compare_state_dict", "extract_state_dict",
           "load_into", "load_state_dict_file", "save_checkpoint", "strip_prefix"]

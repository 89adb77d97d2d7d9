"""Load a grid YAML: include-merge, typed validation, axis expansion, semantic checks.

Every problem is collected with its key path (``axes.diff_mi.attack.k[2]``, ``base.data.private.root``)
and raised together as one :class:`~diffmi_ray.errors.ConfigError` naming the file, before anything runs.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from diffmi_ray.config.experiment import ExperimentConfig, GridConfig
from diffmi_ray.errors import ConfigError


@dataclass
class GridPoint:
    """One expanded grid point."""

    index: int
    point_id: str
    config: ExperimentConfig
    axis_values: dict[str, Any] = field(default_factory=dict)  # dotted key -> value set by axes/variants
    locations: dict[str, str] = field(default_factory=dict)    # dotted key -> where the file set it


@dataclass
class LoadedGrid:
    """A validated grid file: the merged typed config and its expanded points."""

    path: Path
    grid: GridConfig
    points: list[GridPoint]
    raw: dict

    @property
    def storage_root(self) -> str:
        return resolve_storage(self.grid.storage, self.path)


def resolve_storage(storage: str, grid_path: Path | None) -> str:
    """A storage URI or path; a relative local path is taken relative to the current directory."""
    if "://" in storage or os.path.isabs(storage) or grid_path is None:
        return storage
    return os.path.abspath(storage)


# ------------------------------------------------------------------------------------------- YAML


def _read_yaml(path: Path, origin: str | None = None) -> dict:
    if not path.is_file():
        where = f" (included from {origin})" if origin else ""
        raise ConfigError(str(path), [("", f"grid file not found{where}")])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [("", f"invalid YAML: {loc}{getattr(e, 'problem', e)}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", f"a grid file must be a mapping, got {type(data).__name__}")])
    return data


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(obj: Any, path: Path, key: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in string values with environment variables, so grid
    files can name data folders portably (e.g. ``root: ${DIFFMI_DATA:-data}/celeba``)."""
    if isinstance(obj, dict):
        return {k: expand_env(v, path, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, path, f"{key}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str) and "${" in obj:
        def sub(m):
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is None:
                    raise ConfigError(str(path), [(key, f"environment variable {m.group(1)} is not set "
                                                        f"(use ${{{m.group(1)}:-default}} for a default)")])
                val = m.group(2)
            return val
        return _ENV.sub(sub, obj)
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_with_includes(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The grid file's mapping with its ``include`` chain merged in (the including file wins)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(str(_seen[0]), [("include", f"include cycle: {chain}")])
    data = _read_yaml(path, str(_seen[-1]) if _seen else None)
    inc = data.get("include")
    if inc is None:
        return data
    if not isinstance(inc, str):
        raise ConfigError(str(path), [("include", "must be a path string")])
    base = read_with_includes((path.parent / inc), (*_seen, path))
    merged = deep_merge(base, {k: v for k, v in data.items()})
    return merged


# ------------------------------------------------------------------------------------------- paths


def fmt_loc(loc: tuple) -> str:
    """pydantic loc tuple -> ``a.b[2].c``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _pydantic_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    probs = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Drop pydantic's union-branch tags like 'int' / 'list[int]' (they are not keys of the file).
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "float", "str", "bool"))))
        path = fmt_loc(loc)
        if prefix:
            path = prefix + ("." + path if path and not path.startswith("[") else path)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        probs.append((path, msg))
    return probs


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set ``d['a']['b']['c'] = value`` for key ``a.b.c``, creating mappings on the way."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = copy.deepcopy(value)


def _valid_dotted_key(key: str) -> str | None:
    """None if ``key`` names a field of ExperimentConfig, else a message."""
    from pydantic import BaseModel

    model: Any = ExperimentConfig
    for i, part in enumerate(key.split(".")):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None  # inside a free-form dict (e.g. model_kwargs): anything goes
        fields = model.model_fields
        if part not in fields:
            where = ".".join(key.split(".")[:i]) or "the experiment"
            return f"unknown key {part!r} in {where}; valid: {sorted(fields)}"
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) else None
        if model is dict:
            return None
    return None


# ------------------------------------------------------------------------------------------- load


def load_grid(path: str | os.PathLike, *, check_semantics: bool = True) -> LoadedGrid:
    """Read, merge, validate and expand a grid file. Raises ConfigError with every problem found."""
    path = Path(path)
    fname = str(path)
    raw = expand_env(read_with_includes(path), path)
    problems: list[tuple[str, str]] = []

    axes = raw.get("axes") or {}
    variants = raw.get("variants") or []
    base_raw = raw.get("base")
    try:
        grid = GridConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(fname, _pydantic_problems(e)) from None

    # Dimensions of the grid: each axis, then the variants list. A dimension is a list of
    # assignments (dotted key -> value) with the place in the file each came from.
    dims: list[list[dict[str, tuple[Any, str]]]] = []
    for key, values in axes.items():
        msg = _valid_dotted_key(key)
        if msg:
            problems.append((f"axes.{key}", msg))
            continue
        if not isinstance(values, list) or not values:
            problems.append((f"axes.{key}", "must be a non-empty list of values"))
            continue
        dims.append([{key: (v, f"axes.{key}[{i}]")} for i, v in enumerate(values)])
    if variants:
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            problems.append(("variants", "must be a list of mappings (dotted key -> value; {} = the base as is)"))
        else:
            dim = []
            for i, var in enumerate(variants):
                for key in var:
                    msg = _valid_dotted_key(key)
                    if msg:
                        problems.append((f"variants[{i}].{key}", msg))
                dim.append({k: (v, f"variants[{i}].{k}") for k, v in var.items()})
            dims.append(dim)

    # Each assignment must be valid on its own (typed errors located at the axis entry).
    for dim in dims:
        for assignment in dim:
            trial = copy.deepcopy(base_raw)
            for key, (v, _) in assignment.items():
                set_dotted(trial, key, v)
            try:
                ExperimentConfig.model_validate(trial)
            except ValidationError as e:
                for p, m in _pydantic_problems(e):
                    hit = [(k, loc) for k, (_, loc) in assignment.items()
                           if p == k or p.startswith(k + ".") or p.startswith(k + "[")]
                    if hit:
                        k, loc = max(hit, key=lambda t: len(t[0]))
                        problems.append((loc + p[len(k):], m))
                    else:
                        problems.append((f"base.{p}", m))

    points: list[GridPoint] = []
    combos = itertools.product(*[range(len(d)) for d in dims]) if dims else [()]
    for n, combo in enumerate(combos):
        point_raw = copy.deepcopy(base_raw)
        values, locations = {}, {}
        for dim, i in zip(dims, combo):
            for key, (v, loc) in dim[i].items():
                set_dotted(point_raw, key, v)
                values[key] = v
                locations[key] = loc
        try:
            cfg = ExperimentConfig.model_validate(point_raw)
        except ValidationError:
            continue  # its typed problems are reported at the axis entries above
        points.append(GridPoint(n, f"p{n:04d}", cfg, values, locations))

    loaded = LoadedGrid(path=path, grid=grid, points=points, raw=raw)
    if check_semantics:
        from diffmi_ray.config.checks import check_grid

        problems.extend(check_grid(loaded))
    if problems:
        raise ConfigError(fname, _dedupe(problems))
    return loaded


def _dedupe(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out

"""Collect a grid's results from its finished artifacts (no Ray): what the reporting reads.

Written atomically under ``<storage>/<grid name>/``:

``results.csv``
    tidy long table, one row per (point, class, metric) from each evaluate artifact's
    ``per_class.csv`` plus ``class = all`` rows from its ``aggregate.csv``; columns
    :data:`RESULTS_COLUMNS`. Diff-MI-only descriptors (finetune ... alpha) are empty for baselines.
``missing.csv``
    point, metric, reason (from the evaluate artifact's ``missing.json``).
``points/<point>/point.json``
    resolved config, descriptors, status (done / failed / pending), stage keys, failure if any.
``points/<point>/samples.npz``, ``grid.png``
    copied from the evaluate artifact; ``change_rates.json`` from the finetune_cdm artifact.
``grid.yaml``
    the merged grid (includes resolved).
``failures.json``
    one entry per failed point: stage, key, message, where the logs are.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

import yaml

from diffmi_ray.config.experiment import STAGES
from diffmi_ray.pipeline.store import ArtifactStore

RESULTS_COLUMNS = ("grid", "point", "method", "setting", "public_dataset", "private_dataset", "target_model",
                   "eval_model", "defense", "finetune", "finetune_layers", "pgd", "loss", "k", "alpha",
                   "image_size", "class", "metric", "value")
DESCRIPTORS = RESULTS_COLUMNS[2:-3]
MISSING_COLUMNS = ("point", "metric", "reason")


@dataclass
class PointState:
    """Where a grid point stands after a run: ``done``, ``failed`` or ``pending``."""

    status: str
    failure: dict | None = None  # for failed points: stage, key, label, message, logs, record
    extra: dict = field(default_factory=dict)


def descriptors(cfg, eval_model: str) -> dict:
    """Descriptor columns of a grid point (ExperimentConfig) for results.csv and point.json."""
    d = {"method": cfg.method, "setting": cfg.setting, "public_dataset": cfg.data.public.dataset,
         "private_dataset": cfg.data.private.dataset, "target_model": cfg.target.model, "eval_model": eval_model,
         "defense": "bido" if cfg.target.train.bido.enabled else "none",
         "finetune": "", "finetune_layers": "", "pgd": "", "loss": "", "k": "", "alpha": "",
         "image_size": cfg.data.image_size}
    if cfg.method == "diff_mi":
        mc = cfg.diff_mi
        ft = mc.finetune
        d.update(finetune=bool(ft.enabled), pgd=bool(mc.attack.pgd.enabled), loss=mc.attack.loss, k=mc.attack.k,
                 alpha=mc.attack.alpha)
        if ft.enabled:
            d["finetune_layers"] = ft.layers if isinstance(ft.layers, int) else len(ft.layers)
    return d


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _read(store: ArtifactStore, uri: str) -> bytes | None:
    """A file of a finished artifact, read in place (no download of the whole artifact)."""
    return store.fs.cat_file(uri) if store.fs.exists(uri) else None


def _read_csv(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def _value(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _copy(store: ArtifactStore, src: str, dest: str) -> bool:
    data = _read(store, src)
    if data is None:
        return False
    store.write_bytes(dest, data)
    return True


def collect_results(loaded, plan, store: ArtifactStore, states: dict[str, PointState]) -> str:
    """Write the grid's results folder from the store; returns its path/URI."""
    g = loaded.grid
    out = store.grid_dir(g.name)
    rows, missing, failures = [], [], []
    eval_model = g.protocol.eval.model
    keep = set()
    for point, roles in plan.points:
        pid = point.point_id
        keep.add(pid)
        state = states.get(pid) or PointState("pending")
        desc = descriptors(point.config, eval_model)
        pdir = f"{out}/points/{pid}"
        ev = roles["evaluate"]
        files = []
        if state.status == "done" and store.is_done(ev.stage, ev.key):
            art = store.uri(ev.stage, ev.key)
            base = {"grid": g.name, "point": pid, **desc}
            data = _read(store, f"{art}/per_class.csv")
            for r in _read_csv(data) if data else []:
                rows.append({**base, "class": r["class"], "metric": r["metric"], "value": _value(r["value"])})
            data = _read(store, f"{art}/aggregate.csv")
            for r in _read_csv(data) if data else []:
                rows.append({**base, "class": "all", "metric": r["metric"], "value": _value(r["value"])})
            data = _read(store, f"{art}/missing.json")
            for metric, reason in sorted(json.loads(data).items()) if data else []:
                missing.append({"point": pid, "metric": metric, "reason": reason})
            for name in ("samples.npz", "grid.png"):
                if _copy(store, f"{art}/{name}", f"{pdir}/{name}"):
                    files.append(name)
            ft = roles.get("finetune")
            if ft is not None and store.is_done(ft.stage, ft.key):
                if _copy(store, f"{store.uri(ft.stage, ft.key)}/change_rates.json", f"{pdir}/change_rates.json"):
                    files.append("change_rates.json")
        if state.status == "failed" and state.failure:
            failures.append({"point": pid, **desc, **state.failure})
        stages = {role: {"stage": i.stage, "key": i.key, "label": i.label, "done": store.is_done(i.stage, i.key)}
                  for role, i in sorted(roles.items(), key=lambda kv: STAGES.index(kv[1].stage))}
        pj = {"point": pid, "grid": g.name, **desc, "status": state.status, "axis_values": point.axis_values,
              "failure": state.failure, "files": files, "stages": stages,
              "config": point.config.model_dump(mode="json"), **state.extra}
        store.write_text(f"{pdir}/point.json", json.dumps(pj, indent=2, sort_keys=True, default=str))
    _remove_stale_points(store, f"{out}/points", keep)
    store.write_text(f"{out}/results.csv", _csv(rows, RESULTS_COLUMNS))
    store.write_text(f"{out}/missing.csv", _csv(missing, MISSING_COLUMNS))
    raw = dict(loaded.raw)
    raw["storage"] = g.storage
    store.write_text(f"{out}/grid.yaml", yaml.safe_dump(raw, sort_keys=False, default_flow_style=None))
    store.write_text(f"{out}/failures.json", json.dumps(failures, indent=2, sort_keys=True, default=str))
    return out


def _remove_stale_points(store: ArtifactStore, base: str, keep: set[str]) -> None:
    """Point folders of an earlier version of the grid would be read as current points."""
    if not store.fs.exists(base):
        return
    for p in store.fs.ls(base, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep and not name.startswith("."):
            store.fs.rm(p, recursive=True)

"""Run stage instances without Ray: skip finished ones, commit outputs atomically.

The Ray runner (:mod:`diffmi_ray.runner`) calls :func:`run_instance` inside tasks, Tune trials and
Ray Train workers; tests and debugging call it directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from diffmi_ray.pipeline.context import Parent, StageContext
from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.pipeline.stages import get_stage_fn
from diffmi_ray.pipeline.store import ArtifactStore

METRICS = "metrics.json"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def parents_of(inst: StageInstance, store: ArtifactStore) -> dict[str, Parent]:
    out = {}
    for role, (stage, key) in inst.parents.items():
        path = store.local_path(stage, key)
        out[role] = Parent(stage, key, path, json.loads((path / "config.json").read_text()))
    return out


def make_context(inst: StageInstance, store: ArtifactStore, out_dir: Path, *, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "auto", report: Callable[[dict], None] | None = None,
                 log: Callable[[str], None] | None = None, resources: dict | None = None) -> StageContext:
    ckpt = store.checkpoint_dir(inst.stage, inst.key)
    if not store.local:  # remote stores keep resumable state in a local folder of the node
        ckpt = str(store.cache_dir / "checkpoints" / inst.stage / inst.key)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    prefix = f"[{inst.stage} {inst.key[:8]}] "
    return StageContext(
        stage=inst.stage, key=inst.key, config=inst.config, parents=parents_of(inst, store), out_dir=out_dir,
        checkpoint_dir=Path(ckpt), device=dev, rank=rank, world_size=world_size,
        report=report or (lambda m: None), log=log or (lambda s: print(prefix + s, flush=True)),
        resources=resources or {})


def run_instance(inst: StageInstance, store: ArtifactStore, *, device: str | torch.device = "auto",
                 report: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None,
                 rank: int = 0, world_size: int = 1, resources: dict | None = None,
                 fn: Callable | None = None) -> dict:
    """Run one stage instance unless finished; returns its recorded metrics.

    With ``world_size > 1`` every rank runs the stage function, and rank 0 alone commits.
    ``fn`` replaces the registered stage function (test stand-ins).
    """
    if store.is_done(inst.stage, inst.key):
        return read_metrics(store, inst)
    fn = fn or get_stage_fn(inst.stage)
    record = {"stage": inst.stage, "key": inst.key, "label": inst.label, "config": inst.config,
              "parents": {r: f"{s}/{k}" for r, (s, k) in inst.parents.items()}}
    if rank != 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ctx = make_context(inst, store, Path(tmp), rank=rank, world_size=world_size, device=device,
                               report=report, log=log, resources=resources)
            return fn(ctx) or {}
    with store.writer(inst.stage, inst.key, record) as out:
        ctx = make_context(inst, store, out, rank=rank, world_size=world_size, device=device, report=report,
                           log=log, resources=resources)
        t0 = time.time()
        metrics = dict(fn(ctx) or {})
        metrics["seconds"] = round(time.time() - t0, 3)
        (out / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return metrics


def read_metrics(store: ArtifactStore, inst: StageInstance) -> dict:
    p = store.local_path(inst.stage, inst.key) / METRICS
    return json.loads(p.read_text()) if p.exists() else {}


def run_plan_locally(plan, store: ArtifactStore, *, device: str = "auto", log: Callable[[str], None] | None = None,
                     only: set[tuple[str, str]] | None = None) -> dict[tuple[str, str], dict]:
    """Run a whole plan in this process, wave by wave (tests, debugging, `--local`)."""
    results = {}
    for wave in plan.waves():
        for inst in wave:
            if only is not None and inst.id not in only:
                continue
            results[inst.id] = run_instance(inst, store, device=device, log=log)
    return results

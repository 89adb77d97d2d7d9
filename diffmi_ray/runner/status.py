"""``diffmi-ray status GRID.yaml``: done / pending / failed per stage type, read from the store and
the failure records only (no Ray is started, nothing is computed)."""

from __future__ import annotations

import sys

from diffmi_ray.config.experiment import STAGES
from diffmi_ray.pipeline.plan import plan_grid
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.runner import records


def grid_status(loaded) -> dict:
    """Per stage: needed / done / failed / pending key sets; per point: done / failed / pending."""
    plan = plan_grid(loaded)
    store = ArtifactStore(loaded.storage_root)
    stages = {}
    for stage, insts in plan.by_stage().items():
        done_keys = store.done_keys(stage)
        failed_keys = records.failed_keys(store, stage) - done_keys
        keys = {i.key for i in insts}
        stages[stage] = {"needed": keys, "done": keys & done_keys, "failed": keys & failed_keys,
                         "pending": keys - done_keys - failed_keys}
    points = {}
    for point, roles in plan.points:
        ev = roles["evaluate"]
        if ev.key in stages["evaluate"]["done"]:
            points[point.point_id] = ("done", None)
            continue
        bad = [i for i in sorted(roles.values(), key=lambda i: STAGES.index(i.stage))
               if i.key in stages[i.stage]["failed"]]
        points[point.point_id] = ("failed", bad[0]) if bad else ("pending", None)
    return {"plan": plan, "store": store, "stages": stages, "points": points}


def print_status(loaded, out=None) -> int:
    out = out or sys.stdout
    st = grid_status(loaded)
    store, plan = st["store"], st["plan"]
    print(f"grid '{loaded.grid.name}' from {loaded.path}; storage {store.root}", file=out)
    print(f"  {'stage':<18}{'needed':>7}{'done':>7}{'failed':>8}{'pending':>9}", file=out)
    tot = [0, 0, 0, 0]
    for stage in STAGES:
        s = st["stages"][stage]
        row = [len(s["needed"]), len(s["done"]), len(s["failed"]), len(s["pending"])]
        tot = [a + b for a, b in zip(tot, row)]
        print(f"  {stage:<18}{row[0]:>7}{row[1]:>7}{row[2]:>8}{row[3]:>9}", file=out)
    print(f"  {'total':<18}{tot[0]:>7}{tot[1]:>7}{tot[2]:>8}{tot[3]:>9}", file=out)
    pts = st["points"]
    counts = {k: sum(1 for v in pts.values() if v[0] == k) for k in ("done", "failed", "pending")}
    print(f"grid points: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending "
          f"(of {len(pts)})", file=out)
    shown = set()
    for pid, (status, inst) in pts.items():
        if status != "failed":
            continue
        if inst.id not in shown:
            shown.add(inst.id)
            rec = records.read_failure(store, inst.stage, inst.key) or {}
            msg = str(rec.get("message", "")).splitlines()
            print(f"failed: {inst.stage} {inst.key[:8]} ({inst.label}): {msg[0] if msg else '?'}", file=out)
            print(f"        record: {records.failure_path(store, inst.stage, inst.key)}", file=out)
        print(f"        blocks point {pid}", file=out)
    out.flush()
    return 0

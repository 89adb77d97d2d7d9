"""Fast stand-in stage functions for runner tests (``DIFFMI_RAY_STAGES=diffmi_ray.runner.testing``).

They take a fraction of a second, read their parents like real stages do, and write the files the
runner collects (the evaluate artifact's tables and samples, finetune_cdm's ``change_rates.json``).
A distributed stage checks that ``torch.distributed`` works across its workers.
"""

from __future__ import annotations

import json
import time

import numpy as np

SLEEP = 0.2


def _common(ctx) -> dict:
    for role, parent in ctx.parents.items():
        if not (parent.path / "_SUCCESS").exists():
            raise RuntimeError(f"{ctx.stage}: parent {role} is not finished")
    time.sleep(SLEEP)
    out = {"parents": len(ctx.parents), "world_size": ctx.world_size}
    if ctx.world_size > 1:
        import torch
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)
        out["all_reduce"] = float(t.item())
    if ctx.is_main:
        ctx.write_json("fake.json", {"stage": ctx.stage, "key": ctx.key})
    return out


def _evaluate(ctx) -> dict:
    out = _common(ctx)
    classes = int(ctx.config["classes"])
    rng = np.random.default_rng(int(ctx.key[:8], 16))
    acc = [float(rng.uniform()) for _ in range(classes)]
    lines = ["class,metric,value"] + [f"{c},acc1,{a}" for c, a in enumerate(acc)] + \
            [f"{c},psnr,{10 + c}" for c in range(classes)]
    (ctx.out_dir / "per_class.csv").write_text("\n".join(lines) + "\n")
    (ctx.out_dir / "aggregate.csv").write_text(f"metric,value\nacc1,{sum(acc) / classes}\npsnr,{10.5}\nfid,nan\n")
    (ctx.out_dir / "missing.json").write_text(json.dumps({"fid": "inception weights not available (fake)"}))
    n = classes * int(ctx.config["images_per_class"])
    np.savez_compressed(ctx.out_dir / "samples.npz", recon=np.zeros((n, 8, 8, 1), np.uint8),
                        recon_labels=np.arange(n) % classes, private=np.zeros((classes, 8, 8, 1), np.uint8),
                        private_labels=np.arange(classes))
    (ctx.out_dir / "grid.png").write_bytes(b"\x89PNG fake")
    out["acc1"] = sum(acc) / classes
    return out


def _finetune(ctx) -> dict:
    out = _common(ctx)
    ctx.write_json("change_rates.json", {"layers": list(range(1, 14)), "change_rate": [0.1] * 13,
                                         "selected": [1, 2]})
    return out


STAGE_FNS = {"split": _common, "train_classifier": _common, "pseudo_labels": _common, "train_prior": _common,
             "finetune_cdm": _finetune, "attack": _common, "evaluate": _evaluate}

"""Stage `evaluate`: every metric of one attack's reconstructions under the pinned protocol.

Private references are the private TRAIN images of the attacked classes (the images T learned from,
as in the official evaluation), optionally the first N per class (protocol.reference_images_per_class). Outputs: ``per_class.csv`` (class, metric, value), ``aggregate.csv``
(metric, value), ``missing.json`` {metric: reason}, ``notes.json``, ``samples.npz`` (a few
reconstructions and private images per class, uint8 NHWC, for reports) and ``grid.png``.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from diffmi_ray.config.evaluation import EvaluationConfig
from diffmi_ray.data.splits import materialize
from diffmi_ray.metrics.grid import save_image_grid
from diffmi_ray.metrics.suite import evaluate_reconstructions, write_csv_atomic
from diffmi_ray.pipeline.stages.attack import load_recon
from diffmi_ray.pipeline.stages.split import data_config_of, load as load_split
from diffmi_ray.pipeline.stages.train_classifier import load_classifier

SAMPLES_PRIVATE_PER_CLASS = 4


def run(ctx) -> dict:
    cfg = EvaluationConfig.model_validate(ctx.config["evaluation"])
    C = int(ctx.config["classes"])
    recon = load_recon(ctx.parent("attack").path)
    split_parent = ctx.parent("split")
    data = data_config_of(split_parent)
    tensors = materialize(load_split(split_parent.path), data, parts=("train",))
    refs = ctx.config.get("reference_images_per_class")
    keep = torch.cat([torch.nonzero(tensors.train_y == c).flatten()[:refs] for c in range(C)])
    priv_x, priv_y = tensors.train_x[keep], tensors.train_y[keep]
    eval_model = load_classifier(ctx.parent("eval").path, ctx.device)

    res = evaluate_reconstructions(recon["images"], recon["labels"], priv_x, priv_y, eval_model, cfg,
                                   device=ctx.device, log=ctx.log)
    write_csv_atomic(res.per_class, ctx.out_dir / "per_class.csv")
    write_csv_atomic(res.aggregate, ctx.out_dir / "aggregate.csv")
    ctx.write_json("missing.json", res.missing)
    ctx.write_json("notes.json", {"notes": res.notes, "timings": res.timings})
    for metric, reason in res.missing.items():
        ctx.log(f"metric {metric} missing: {reason}")

    # A few private images per class beside every reconstruction, for report image grids.
    sel = torch.cat([torch.nonzero(priv_y == c).flatten()[:SAMPLES_PRIVATE_PER_CLASS] for c in range(C)])
    np.savez_compressed(ctx.out_dir / "samples.npz", recon=_nhwc(recon["images"]),
                        recon_labels=recon["labels"].numpy(), private=_nhwc(priv_x[sel]),
                        private_labels=priv_y[sel].numpy())
    if cfg.write_grid:
        save_image_grid(ctx.out_dir / "grid.png", recon["images"], recon["labels"], priv_x, priv_y,
                        n_private_per_class=cfg.grid_private_per_class, max_classes=cfg.grid_max_classes)
    out = {k: v for k, v in res.values().items() if np.isfinite(v)}
    out["missing"] = sorted(res.missing)
    return out


def _nhwc(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0,1] -> uint8 (N, H, W, C)."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_results(path) -> dict:
    """Per-class and aggregate tables plus missing reasons of a finished evaluate artifact."""
    import pandas as pd
    from pathlib import Path

    p = Path(path)
    return {"per_class": pd.read_csv(p / "per_class.csv"), "aggregate": pd.read_csv(p / "aggregate.csv"),
            "missing": json.loads((p / "missing.json").read_text())}

"""Stage `train_prior`: train (or load) a method's generative prior; dispatches on ``config.kind``.

Each kind's per-worker training loop lives in :mod:`diffmi_ray.training` and exposes
``train(ctx) -> dict`` (writes the artifact) and ``load(path, device)`` (reads it back).
"""

from __future__ import annotations

import importlib
from types import ModuleType

PRIOR_KINDS = {
    "cdm": "diffmi_ray.training.cdm",              # Diff-MI conditional diffusion model
    "gan_wgangp": "diffmi_ray.training.gan_wgangp",  # GMI (also VMI / PPA at CPU scale)
    "gan_kedmi": "diffmi_ray.training.gan_kedmi",    # KED-MI inversion-specific GAN
    "gan_plgmi": "diffmi_ray.training.gan_plgmi",    # PLG-MI conditional GAN on pseudo-labels
}


def prior_module(kind: str) -> ModuleType:
    if kind not in PRIOR_KINDS:
        raise KeyError(f"unknown prior kind {kind!r}; valid: {sorted(PRIOR_KINDS)}")
    return importlib.import_module(PRIOR_KINDS[kind])


def run(ctx) -> dict:
    return prior_module(ctx.config["kind"]).train(ctx)

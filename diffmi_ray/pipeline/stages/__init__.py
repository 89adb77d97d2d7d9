"""Stage functions, one module per stage type. Each exposes ``run(ctx: StageContext) -> dict``."""

from __future__ import annotations

import importlib
from typing import Callable

from diffmi_ray.config.experiment import STAGES


def get_stage_fn(stage: str) -> Callable:
    """The ``run`` function of a stage type (imported lazily: stages pull in heavy modules)."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; valid: {list(STAGES)}")
    return importlib.import_module(f"diffmi_ray.pipeline.stages.{stage}").run

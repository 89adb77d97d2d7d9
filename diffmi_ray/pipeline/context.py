"""What a stage function receives: its config, its parents' artifacts, where to write, and hooks.

A stage is a plain function ``run(ctx: StageContext) -> dict`` (metrics to record). It writes its
outputs into ``ctx.out_dir``; the executor commits them atomically when it returns. Training stages
that run data-parallel are called once per worker: ``ctx.rank``/``ctx.world_size`` say which, and
only rank 0's ``out_dir`` is committed. Long stages save resumable state with
``ctx.save_checkpoint`` and look for it with ``ctx.load_checkpoint`` when they start.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from diffmi_ray.errors import StageError


@dataclass
class Parent:
    """A finished parent artifact: its stage, key, local folder and resolved config."""

    stage: str
    key: str
    path: Path
    config: dict


@dataclass
class StageContext:
    stage: str
    key: str
    config: dict
    parents: dict[str, Parent]
    out_dir: Path
    checkpoint_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    report: Callable[[dict], None] = lambda metrics: None
    log: Callable[[str], None] = print
    resources: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def parent(self, role: str) -> Parent:
        if role not in self.parents:
            raise StageError(f"{self.stage}/{self.key}: missing parent role {role!r}; have {sorted(self.parents)}")
        return self.parents[role]

    # ------------------------------------------------------------- resumable state
    def save_checkpoint(self, state: dict, name: str = "last.pt") -> None:
        """Atomically save resumable ``state`` (rank 0 only; other ranks return)."""
        if not self.is_main:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_dir / f".{name}.{uuid.uuid4().hex[:8]}"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_dir / name)

    def load_checkpoint(self, name: str = "last.pt") -> dict | None:
        """The last saved state, or None. Loaded with weights_only (tensors, numbers, dicts)."""
        p = self.checkpoint_dir / name
        if not p.exists():
            return None
        return torch.load(p, map_location="cpu", weights_only=True)

    def check_finite(self, name: str, value: Any) -> None:
        """Fail the stage with a clear message when a loss is NaN or infinite."""
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if v != v or v in (float("inf"), float("-inf")):
            raise StageError(f"{self.stage}/{self.key}: {name} became {v}; the run diverged "
                             "(lower the learning rate or check the inputs)")

    def write_json(self, name: str, obj: Any) -> None:
        (self.out_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)

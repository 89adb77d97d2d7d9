"""Test hooks: injected faults and replacement stage functions (read by the driver from the
environment and passed to every task explicitly, so they also reach an already running Ray).

``DIFFMI_RAY_FAULT`` holds rules ``action:stage[:match]`` separated by ``;``. ``match`` is a
substring of the instance's label (``attack gmi``) or a prefix of its key; without it every
instance of the stage matches. Actions:

``fail``
    the stage raises :class:`~diffmi_ray.errors.StageError` every time it runs (after its execution
    record is written, so it counts as an execution);
``crash-once``
    the worker process dies (``os._exit``) the first time the stage runs in this storage root,
    exercising Ray's retries (task retries, Ray Train / Tune FailureConfig);
``interrupt``
    the driver sends itself SIGINT (as Ctrl-C would) as soon as a matching instance has finished;
``slow``
    the worker waits ``SLOW_SECONDS`` before running the stage (so an interrupt lands while it runs).

``DIFFMI_RAY_STAGES`` names a module whose ``STAGE_FNS`` dict (stage -> ``run(ctx)``) replaces the
real stage functions (fast runner tests; see :mod:`diffmi_ray.runner.testing`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from diffmi_ray.config.experiment import STAGES
from diffmi_ray.errors import StageError, UserError

FAULT_ENV = "DIFFMI_RAY_FAULT"
STAGES_ENV = "DIFFMI_RAY_STAGES"
ACTIONS = ("fail", "crash-once", "interrupt", "slow")
SLOW_SECONDS = 6.0


@dataclass(frozen=True)
class Fault:
    action: str
    stage: str
    match: str = ""

    def matches(self, stage: str, key: str, label: str) -> bool:
        return stage == self.stage and (not self.match or self.match in label or key.startswith(self.match))


def parse_faults(text: str | None) -> list[Fault]:
    out = []
    for rule in (text or "").replace(",", ";").split(";"):
        rule = rule.strip()
        if not rule:
            continue
        parts = rule.split(":", 2)
        if len(parts) < 2 or parts[0] not in ACTIONS or parts[1] not in STAGES:
            raise UserError(f"{FAULT_ENV}: bad rule {rule!r}; expected action:stage[:match] with action in "
                            f"{list(ACTIONS)} and stage in {list(STAGES)}")
        out.append(Fault(parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return out


def faults_from_env() -> list[Fault]:
    return parse_faults(os.environ.get(FAULT_ENV))


def apply_worker_faults(faults: list[Fault], store, stage: str, key: str, label: str) -> None:
    """Raise or die here if a worker-side rule matches this instance."""
    for f in faults:
        if not f.matches(stage, key, label):
            continue
        if f.action == "fail":
            raise StageError(f"{stage}/{key[:8]} ({label}): injected fault ({FAULT_ENV}={f.action}:{f.stage}"
                             f"{':' + f.match if f.match else ''})")
        if f.action == "slow":
            import time

            time.sleep(SLOW_SECONDS)
        if f.action == "crash-once":
            marker = f"{store.root}/faults/crash-once-{stage}-{key}"
            if not store.fs.exists(marker):
                store.write_text(marker, "crashed once\n")
                os._exit(17)


def stage_override(module: str | None, stage: str):
    """The stand-in function of ``stage`` in ``module.STAGE_FNS`` (test stand-ins), or None (the real stage)."""
    if not module:
        return None
    return importlib.import_module(module).STAGE_FNS.get(stage)

"""Run one stage instance where the runner put it (Ray task, Ray Train worker, Tune trial, or the
driver itself with ``--local``), keeping the runner's records. No Ray import here.

:func:`execute` wraps :func:`diffmi_ray.pipeline.execute.run_instance` (which skips finished
instances and commits atomically) with what the runner needs around every actual execution:

* an execution record (``executions/``), written before the stage starts and completed after;
* the stage's log lines appended to ``logs/<stage>/<key>.log`` (and printed, so they also land in
  the Ray worker's log);
* on an exception, a failure record (``failures/<stage>/<key>.json``) with the message, traceback
  and where the logs are; the exception is re-raised so Ray's retries see it;
* test hooks: injected faults and replacement stage functions (:mod:`diffmi_ray.runner.faults`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field

from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.runner import records
from diffmi_ray.runner.faults import Fault, apply_worker_faults, stage_override


@dataclass
class WorkerOptions:
    """What every execution needs besides its instance; a plain picklable value."""

    storage: str
    device: str = "auto"
    torch_threads: int = 0
    stage_module: str | None = None
    faults: list[tuple[str, str, str]] = field(default_factory=list)
    echo: bool = True  # print log lines (to the Ray worker log, or the console with --local)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerOptions":
        return cls(**d)


class StageLog:
    """``ctx.log``: print a prefixed line and append it to the instance's log file."""

    def __init__(self, store: ArtifactStore, inst: StageInstance, execution: str | None, echo: bool, rank: int):
        self.store = store
        self.path = records.log_path(store, inst.stage, inst.key)
        self.prefix = f"[{inst.stage} {inst.key[:8]}{'' if rank == 0 else f' rank{rank}'}] "
        self.echo = echo
        self.keep = rank == 0
        self.buffer: list[str] = []
        self._write(f"--- execution {execution} pid {os.getpid()} ---")

    def _write(self, line: str) -> None:
        if not self.keep:
            return
        if self.store.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")
        else:
            self.buffer.append(line)

    def __call__(self, msg: str) -> None:
        if self.echo:
            print(self.prefix + str(msg), flush=True)
        self._write(str(msg))

    def close(self) -> None:
        if self.keep and self.buffer and not self.store.local:
            old = ""
            try:
                if self.store.fs.exists(self.path):
                    with self.store.fs.open(self.path, "r") as f:
                        old = f.read()
            except OSError:
                pass
            self.store.write_text(self.path, old + "\n".join(self.buffer) + "\n")
            self.buffer = []


def _device(name: str):
    """'auto' / 'cpu' / 'cuda' pass through; an explicit one ('cuda:1', from Ray Train) becomes a torch.device."""
    if name in ("auto", "cpu", "cuda"):
        return name
    import torch

    return torch.device(name)


def execute(inst: StageInstance | dict, opts: WorkerOptions | dict, *, rank: int = 0, world_size: int = 1,
            resources: dict | None = None, report=None, log_hint: dict | None = None) -> dict:
    """Run ``inst`` unless its artifact is finished; returns the stage's metrics.

    Every rank of a data-parallel stage calls this; rank 0 alone keeps records and commits.
    """
    from diffmi_ray.pipeline.execute import read_metrics, run_instance

    inst = StageInstance.from_dict(inst) if isinstance(inst, dict) else inst
    opts = WorkerOptions.from_dict(opts) if isinstance(opts, dict) else opts
    store = ArtifactStore(opts.storage)
    if store.is_done(inst.stage, inst.key):
        return read_metrics(store, inst)
    if opts.torch_threads > 0:
        import torch

        torch.set_num_threads(opts.torch_threads)
    main = rank == 0
    exe = records.Execution(store, inst.stage, inst.key, inst.label, rank, world_size) if main else None
    log = StageLog(store, inst, exe.id if exe else None, opts.echo, rank)
    logs = {"stage_log": log.path, **(log_hint or {})}
    try:
        if main:
            apply_worker_faults([Fault(*f) for f in opts.faults], store, inst.stage, inst.key, inst.label)
        metrics = run_instance(inst, store, device=_device(opts.device), report=report, log=log, rank=rank,
                               world_size=world_size, resources=resources,
                               fn=stage_override(opts.stage_module, inst.stage))
    except KeyboardInterrupt:
        if exe:
            exe.finish("interrupted")
        log.close()
        raise
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised for Ray's retries
        if exe:
            rec = records.failure_record(inst.stage, inst.key, inst.label, e, logs=logs, execution=exe.id)
            records.write_failure(store, rec)
            exe.finish("failed", message=rec["message"])
            log(f"FAILED: {rec['message']}")
            print(rec["traceback"], file=sys.stderr, flush=True)
        log.close()
        raise
    if exe:
        exe.finish("ok")
        records.clear_failure(store, inst.stage, inst.key)
    log.close()
    return metrics

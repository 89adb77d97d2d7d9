"""Small JSON records the runner keeps beside the artifacts (no Ray here).

``<storage>/executions/<stage>-<key>-<uuid>.json``
    One file per *actual* execution of a stage function (skips of finished instances write
    nothing): written with ``status: running`` when the function starts and rewritten with
    ``ok`` / ``failed`` / ``interrupted`` and the seconds it took when it ends. Counting these files
    proves that each unique instance ran once and that a rerun computed nothing.
``<storage>/failures/<stage>/<key>.json``
    The last failure of an unfinished instance: message, error type, traceback and where its logs
    are. Removed when the instance later succeeds.
``<storage>/logs/<stage>/<key>.log``
    What the stage logged (``ctx.log``), appended across attempts.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass

from diffmi_ray.errors import UserError
from diffmi_ray.pipeline.store import ArtifactStore

EXECUTIONS = "executions"
FAILURES = "failures"
LOGS = "logs"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


def log_path(store: ArtifactStore, stage: str, key: str) -> str:
    return f"{store.root}/{LOGS}/{stage}/{key}.log"


def failure_path(store: ArtifactStore, stage: str, key: str) -> str:
    return f"{store.root}/{FAILURES}/{stage}/{key}.json"


# ----------------------------------------------------------------------------------- executions


@dataclass
class Execution:
    """The record of one execution of a stage function; :meth:`finish` rewrites it."""

    store: ArtifactStore
    stage: str
    key: str
    label: str
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        self.id = uuid.uuid4().hex[:12]
        self.path = f"{self.store.root}/{EXECUTIONS}/{self.stage}-{self.key}-{self.id}.json"
        self.t0 = time.time()
        self._write("running")

    def _write(self, status: str, **extra) -> None:
        rec = {"stage": self.stage, "key": self.key, "label": self.label, "execution": self.id,
               "status": status, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t0)),
               "host": socket.gethostname(), "pid": os.getpid(), "world_size": self.world_size, **extra}
        self.store.write_text(self.path, json.dumps(rec, indent=2, sort_keys=True))

    def finish(self, status: str, **extra) -> None:
        self._write(status, finished=_now(), seconds=round(time.time() - self.t0, 3), **extra)


def read_executions(store: ArtifactStore) -> list[dict]:
    """Every execution record under the storage root (unreadable ones are skipped)."""
    base = f"{store.root}/{EXECUTIONS}"
    if not store.fs.exists(base):
        return []
    out = []
    for p in sorted(store.fs.ls(base, detail=False)):
        if not p.endswith(".json") or p.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            with store.fs.open(p, "r") as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue  # a record being rewritten right now; harmless to skip
    return out


# ----------------------------------------------------------------------------------- failures


def describe_error(exc: BaseException) -> tuple[str, str]:
    """``(message, error_type)`` of an exception, unwrapping Ray's wrappers.

    A :class:`~diffmi_ray.errors.UserError` keeps its plain message; other errors are prefixed with
    their type (``StageError: train_prior/ab12: loss became nan ...``).
    """
    exc = unwrap(exc)
    if isinstance(exc, UserError):
        return str(exc), type(exc).__name__
    name = type(exc).__name__
    text = str(exc).strip()
    return (f"{name}: {text}" if text else name), name


def unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray task / Train worker-group / Tune wrappers, where known."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException):
            exc = cause
            continue
        wf = getattr(exc, "worker_failures", None)  # ray.train WorkerGroupError: {rank: exception}
        if isinstance(wf, dict) and wf:
            exc = wf[min(wf)]
            continue
        cf = getattr(exc, "controller_failure", None)  # ray.train ControllerError
        if isinstance(cf, BaseException):
            exc = cf
            continue
        break
    return exc


def format_traceback(exc: BaseException) -> str:
    remote = getattr(exc, "traceback_str", None)
    if remote:
        return str(remote)
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def failure_record(stage: str, key: str, label: str, exc: BaseException, *, logs: dict | None = None,
                   execution: str | None = None) -> dict:
    message, etype = describe_error(exc)
    return {"stage": stage, "key": key, "label": label, "message": message, "error_type": etype,
            "traceback": format_traceback(exc), "logs": logs or {}, "execution": execution, "time": _now(),
            "host": socket.gethostname(), "pid": os.getpid()}


def write_failure(store: ArtifactStore, record: dict) -> str:
    path = failure_path(store, record["stage"], record["key"])
    store.write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str))
    return path


def read_failure(store: ArtifactStore, stage: str, key: str) -> dict | None:
    path = failure_path(store, stage, key)
    try:
        if not store.fs.exists(path):
            return None
        with store.fs.open(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def clear_failure(store: ArtifactStore, stage: str, key: str) -> None:
    path = failure_path(store, stage, key)
    try:
        if store.fs.exists(path):
            store.fs.rm(path)
    except OSError:
        pass


def failed_keys(store: ArtifactStore, stage: str) -> set[str]:
    base = f"{store.root}/{FAILURES}/{stage}"
    if not store.fs.exists(base):
        return set()
    return {p.rstrip("/").rsplit("/", 1)[-1][:-len(".json")] for p in store.fs.ls(base, detail=False)
            if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")}

"""The live progress view: a compact plain-text block, printed when something changed (at most
every ``DIFFMI_RAY_PROGRESS_SECONDS``, default 5 s) and at least once a minute.

Example::

    [smoke +0:01:12] stage                     done   run queue  wait  fail   (of)
                     split                        1     0     0     0     0      1
                     train_classifier             2     0     0     0     0      2
                     train_prior                  1     1     0     0     0      2
                     ...
                     trials (attack+evaluate)     0     0     0     2     0      2
                     running: train_prior 3fa2c1d0 (prior cdm) 0:00:41

``run``: the stage function has started (its execution record exists); ``queue``: submitted to
Ray, waiting for resources; ``wait``: parents not finished yet; ``fail``: failed, or below a failure.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from diffmi_ray.config.experiment import STAGES

DEFAULT_INTERVAL = 5.0


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Progress:
    """Counts per stage (done / running / waiting / failed) and per trial, with elapsed time."""

    grid: str
    totals: dict[str, int]
    out: object = None
    interval: float = field(default_factory=lambda: float(os.environ.get("DIFFMI_RAY_PROGRESS_SECONDS",
                                                                         DEFAULT_INTERVAL)))

    def __post_init__(self):
        self.t0 = time.time()
        self.last = 0.0
        self.last_counts: tuple | None = None
        self.heartbeat = max(60.0, self.interval)
        self.done: dict[str, set] = {s: set() for s in STAGES}
        self.failed: dict[str, set] = {s: set() for s in STAGES}
        self.running: dict[tuple[str, str], tuple[str, float]] = {}  # submitted: label, since
        self.started: set[tuple[str, str]] = set()
        self.trials = {"total": 0, "done": 0, "running": 0, "waiting": 0, "failed": 0}
        self.out = self.out or sys.stdout

    # ---------------------------------------------------------------- updates
    def mark_done(self, stage: str, key: str) -> None:
        self.running.pop((stage, key), None)
        self.started.discard((stage, key))
        self.failed[stage].discard(key)
        self.done[stage].add(key)

    def mark_running(self, stage: str, key: str, label: str) -> None:
        """Submitted (queued until :meth:`mark_started`)."""
        self.running[(stage, key)] = (label, time.time())

    def mark_started(self, stage: str, key: str, label: str) -> None:
        if (stage, key) in self.done[stage] or (stage, key) in self.started:
            return
        self.started.add((stage, key))
        self.running[(stage, key)] = (label, time.time())

    def mark_failed(self, stage: str, key: str) -> None:
        self.running.pop((stage, key), None)
        self.started.discard((stage, key))
        self.failed[stage].add(key)

    def set_trials(self, **counts: int) -> None:
        self.trials.update(counts)

    # ---------------------------------------------------------------- output
    def render(self) -> str:
        now = time.time()
        head = f"[{self.grid} +{_hms(now - self.t0)}]"
        lines = [f"{head} {'stage':<24}{'done':>6}{'run':>6}{'queue':>6}{'wait':>6}{'fail':>6}{'(of)':>7}"]
        pad = " " * (len(head) + 1)
        for s in STAGES:
            total = self.totals.get(s, 0)
            if not total:
                continue
            done, failed = len(self.done[s]), len(self.failed[s])
            sub = [i for i in self.running if i[0] == s]
            run = sum(1 for i in sub if i in self.started)
            queue = len(sub) - run
            wait = max(0, total - done - failed - len(sub))
            lines.append(f"{pad}{s:<24}{done:>6}{run:>6}{queue:>6}{wait:>6}{failed:>6}{total:>7}")
        t = self.trials
        if t["total"]:
            lines.append(f"{pad}{'trials (attack+evaluate)':<24}{t['done']:>6}{t['running']:>6}{'':>6}"
                         f"{t['waiting']:>6}{t['failed']:>6}{t['total']:>7}")
        running = sorted(((i, v) for i, v in self.running.items() if i in self.started), key=lambda kv: kv[1][1])
        for (stage, key), (label, since) in running[:6]:
            lines.append(f"{pad}running: {stage} {key[:8]} ({label}) {_hms(now - since)}")
        if len(running) > 6:
            lines.append(f"{pad}... and {len(running) - 6} more running")
        return "\n".join(lines)

    def due(self) -> bool:
        return time.time() - self.last >= self.interval

    def counts(self) -> tuple:
        per_stage = tuple((len(self.done[s]), len(self.failed[s]), tuple(sorted(i for i in self.running if i[0] == s)),
                           len(self.started)) for s in STAGES)
        return per_stage + (tuple(sorted(self.trials.items())),)

    def tick(self, force: bool = False) -> None:
        """Print the block if something changed and the interval has passed, or a minute has
        passed anyway, or ``force``."""
        now = time.time()
        if not force:
            if now - self.last < self.interval:
                return
            if self.counts() == self.last_counts and now - self.last < self.heartbeat:
                return
        self.last = now
        self.last_counts = self.counts()
        print(self.render(), file=self.out, flush=True)

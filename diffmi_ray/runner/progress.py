"""The live progress view: a compact plain-text block printed every few seconds.

Example::

    [smoke +0:01:12] stage             done  run  wait  fail  (of)
      split                             1    0     0     0     1
      train_classifier                  2    0     0     0     2
      train_prior                       1    1     0     0     2
      ...
      trials (attack+evaluate)          0    0     2     0     2
      running: train_prior 3fa2c1d0 (prior cdm) 0:00:41
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
        self.done: dict[str, set] = {s: set() for s in STAGES}
        self.failed: dict[str, set] = {s: set() for s in STAGES}
        self.running: dict[tuple[str, str], tuple[str, float]] = {}
        self.trials = {"total": 0, "done": 0, "running": 0, "waiting": 0, "failed": 0}
        self.out = self.out or sys.stdout

    # ---------------------------------------------------------------- updates
    def mark_done(self, stage: str, key: str) -> None:
        self.running.pop((stage, key), None)
        self.failed[stage].discard(key)
        self.done[stage].add(key)

    def mark_running(self, stage: str, key: str, label: str) -> None:
        self.running[(stage, key)] = (label, time.time())

    def mark_failed(self, stage: str, key: str) -> None:
        self.running.pop((stage, key), None)
        self.failed[stage].add(key)

    def set_trials(self, **counts: int) -> None:
        self.trials.update(counts)

    # ---------------------------------------------------------------- output
    def render(self) -> str:
        now = time.time()
        head = f"[{self.grid} +{_hms(now - self.t0)}]"
        lines = [f"{head} {'stage':<24}{'done':>6}{'run':>6}{'wait':>6}{'fail':>6}{'(of)':>7}"]
        pad = " " * (len(head) + 1)
        for s in STAGES:
            total = self.totals.get(s, 0)
            if not total:
                continue
            done, failed = len(self.done[s]), len(self.failed[s])
            run = sum(1 for (st, _k) in self.running if st == s)
            wait = max(0, total - done - failed - run)
            lines.append(f"{pad}{s:<24}{done:>6}{run:>6}{wait:>6}{failed:>6}{total:>7}")
        t = self.trials
        if t["total"]:
            lines.append(f"{pad}{'trials (attack+evaluate)':<24}{t['done']:>6}{t['running']:>6}{t['waiting']:>6}"
                         f"{t['failed']:>6}{t['total']:>7}")
        for (stage, key), (label, since) in sorted(self.running.items(), key=lambda kv: kv[1][1])[:6]:
            lines.append(f"{pad}running: {stage} {key[:8]} ({label}) {_hms(now - since)}")
        if len(self.running) > 6:
            lines.append(f"{pad}... and {len(self.running) - 6} more running")
        return "\n".join(lines)

    def tick(self, force: bool = False) -> None:
        """Print the block if the interval has passed (or ``force``)."""
        now = time.time()
        if force or now - self.last >= self.interval:
            self.last = now
            print(self.render(), file=self.out, flush=True)

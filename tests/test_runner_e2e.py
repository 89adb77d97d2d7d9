"""End to end through real Ray with the REAL stages on grids/smoke.yaml (Diff-MI and GMI, tiny):
each unique instance runs once, an interrupted run resumes with zero recomputation, a failing
trial gives a non-zero exit and a complete results table of the rest.

The tests share one storage root and run in file order (the second reuses the first's artifacts).
"""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import pytest

from diffmi_ray.config.loader import load_grid
from diffmi_ray.pipeline.plan import plan_grid
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.runner import records
from diffmi_ray.runner.driver import run_grid
from diffmi_ray.runner.status import print_status
from tests.test_runner import smoke_grid

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture
def real_stages(monkeypatch):
    monkeypatch.delenv("DIFFMI_RAY_STAGES", raising=False)
    monkeypatch.delenv("DIFFMI_RAY_FAULT", raising=False)
    monkeypatch.setenv("DIFFMI_RAY_PROGRESS_SECONDS", "5")
    monkeypatch.setenv("DIFFMI_RAY_REPORT", "0")
    return monkeypatch


def execution_records(store: Path) -> list[dict]:
    return records.read_executions(ArtifactStore(store))


def read_results(store: Path) -> list[dict]:
    with open(store / "smoke" / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_interrupt_then_resume_runs_each_instance_once(workdir, real_stages, ray_session, capsys):
    grid = smoke_grid(workdir)
    store = workdir / "store"
    plan = plan_grid(load_grid(grid))
    ids = set(plan.instances)
    assert len(plan.points) == 2 and len(ids) == 11  # split and both classifiers are shared

    # Ctrl-C as soon as GMI's prior is trained (while other upstream work is still under way)
    real_stages.setenv("DIFFMI_RAY_FAULT", "interrupt:train_prior:gan")
    assert run_grid(load_grid(grid), resume_command=f"diffmi-ray run {grid}") == 130
    out = capsys.readouterr().out
    assert f"Resume with:\n  diffmi-ray run {grid}" in out
    st = ArtifactStore(store)
    done_before = {i for i in ids if st.is_done(*i)}
    assert 0 < len(done_before) < len(ids) and not any(i[0] == "evaluate" for i in done_before)
    runs_before = collections.Counter((r["stage"], r["key"]) for r in execution_records(store))

    real_stages.delenv("DIFFMI_RAY_FAULT")
    real_stages.setenv("DIFFMI_RAY_REPORT", "1")
    assert run_grid(load_grid(grid)) == 0
    real_stages.setenv("DIFFMI_RAY_REPORT", "0")
    out = capsys.readouterr().out
    assert "2 done, 0 failed, 0 pending" in out
    assert f"report: {store / 'smoke' / 'report' / 'report.html'}" in out
    recs = execution_records(store)
    runs = collections.Counter((r["stage"], r["key"]) for r in recs)
    ok = collections.Counter((r["stage"], r["key"]) for r in recs if r["status"] == "ok")
    assert set(ok) == ids and all(n == 1 for n in ok.values())  # every unique instance finished once
    assert all(runs[i] == runs_before[i] == 1 for i in done_before)  # nothing finished was recomputed
    assert all(n <= 2 for n in runs.values())  # at most the one attempt cut off by the interrupt

    rows = read_results(store)
    assert {r["point"] for r in rows} == {"p0000", "p0001"} and {r["method"] for r in rows} == {"diff_mi", "gmi"}
    assert {("p0000", "acc1"), ("p0001", "acc1")} <= {(r["point"], r["metric"]) for r in rows if r["class"] == "all"}
    assert (store / "smoke" / "points" / "p0000" / "change_rates.json").is_file()
    assert (store / "smoke" / "points" / "p0001" / "samples.npz").is_file()

    # a third run computes nothing at all
    assert run_grid(load_grid(grid)) == 0
    assert len(execution_records(store)) == len(recs)
    assert "11 already done" in capsys.readouterr().out


def test_failing_trial_exits_nonzero_with_table_of_the_rest(workdir, real_stages, ray_session, capsys):
    # Four points: the two Diff-MI points are identical (one shared attack trial, results fanned out),
    # GMI with 3 iterations is finished already, GMI with 4 iterations is new and its attack fails.
    grid = smoke_grid(workdir, name="grid4.yaml", axes={"method": ["diff_mi", "gmi"], "gmi.attack.iterations": [3, 4]})
    store = workdir / "store"
    plan = plan_grid(load_grid(grid))
    assert len(plan.points) == 4 and len(plan.instances) == 13
    before = len(execution_records(store))

    real_stages.setenv("DIFFMI_RAY_FAULT", "fail:attack:gmi")
    assert run_grid(load_grid(grid)) == 1
    out = capsys.readouterr().out
    assert "3 done, 1 failed, 0 pending" in out
    assert "p0003 (method=gmi, gmi.attack.iterations=4): stage attack (attack gmi" in out
    assert "StageError" in out and "injected fault" in out and "stage_log:" in out

    recs = execution_records(store)
    failed_attack = next(r["attack"] for p, r in plan.points if p.point_id == "p0003")
    fresh = [r for r in recs if (r["stage"], r["key"]) == failed_attack.id]
    assert fresh and all(r["status"] == "failed" for r in fresh)
    assert len(recs) - before == len(fresh)  # nothing but the failing attack (and its retry) ran
    rows = read_results(store)
    assert {r["point"] for r in rows} == {"p0000", "p0001", "p0002"}
    dm = {(r["class"], r["metric"]): r["value"] for r in rows if r["point"] == "p0000"}
    assert dm == {(r["class"], r["metric"]): r["value"] for r in rows if r["point"] == "p0001"}
    fails = json.loads((store / "smoke" / "failures.json").read_text())
    assert [(f["point"], f["stage"]) for f in fails] == [("p0003", "attack")]
    assert json.loads((store / "smoke" / "points" / "p0003" / "point.json").read_text())["status"] == "failed"

    assert print_status(load_grid(grid)) == 0
    st = capsys.readouterr().out
    assert "3 done, 1 failed, 0 pending" in st and "failed: attack" in st

"""Runner tests with stand-in stages (diffmi_ray.runner.testing): results collection, status,
failures, interruption and resume -- in-process (``--local``, no Ray) and through the
session-scoped Ray (Tune trials, a 2-worker Ray Train job, a SIGKILLed driver)."""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffmi_ray.config.loader import load_grid
from diffmi_ray.errors import StageError, UserError
from diffmi_ray.pipeline.plan import plan_grid
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.runner import records
from diffmi_ray.runner.driver import run_grid
from diffmi_ray.runner.faults import parse_faults
from diffmi_ray.runner.progress import Progress
from diffmi_ray.runner.results import RESULTS_COLUMNS
from diffmi_ray.runner.session import short_temp_dir
from diffmi_ray.runner.status import print_status

REPO = Path(__file__).resolve().parents[1]
FAKE = "diffmi_ray.runner.testing"


def _nan_prior(ctx):
    ctx.check_finite("generator loss", float("nan"))


def _user_error_split(ctx):
    raise UserError("dataset folder /nowhere/celeba is missing (set data.private.root)")


# Stage overrides for in-process runs (DIFFMI_RAY_STAGES=tests.test_runner); see the tests below.
STAGE_FNS: dict = {}


def smoke_grid(tmp_path: Path, name: str = "grid.yaml", **overrides) -> Path:
    """grids/smoke.yaml copied into tmp_path with storage there; keyword args replace top-level keys."""
    data = yaml.safe_load((REPO / "grids" / "smoke.yaml").read_text())
    data["include"] = str(REPO / "grids" / data["include"])
    data["storage"] = str(tmp_path / "store")
    data.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def executions(storage: Path) -> collections.Counter:
    return collections.Counter((r["stage"], r["key"]) for r in records.read_executions(ArtifactStore(storage)))


def plan_ids(grid: Path) -> set:
    return set(plan_grid(load_grid(grid)).instances)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def fake_stages(monkeypatch):
    monkeypatch.setenv("DIFFMI_RAY_STAGES", FAKE)
    monkeypatch.setenv("DIFFMI_RAY_PROGRESS_SECONDS", "1")
    monkeypatch.delenv("DIFFMI_RAY_FAULT", raising=False)
    monkeypatch.setenv("DIFFMI_RAY_REPORT", "0")
    return monkeypatch


# ------------------------------------------------------------------------------------ no Ray


def test_local_run_collects_results(tmp_path, fake_stages, capsys):
    grid = smoke_grid(tmp_path)
    fake_stages.setenv("DIFFMI_RAY_REPORT", "1")
    assert run_grid(load_grid(grid), local=True) == 0
    out = capsys.readouterr().out
    assert "2 done, 0 failed, 0 pending" in out and "trials (attack+evaluate)" in out
    if "report: not built" not in out:  # reports come from another part of the project
        assert (tmp_path / "store" / "smoke" / "report" / "report.html").is_file()
    fake_stages.setenv("DIFFMI_RAY_REPORT", "0")
    store = tmp_path / "store"
    # every unique instance ran exactly once
    assert executions(store) == collections.Counter(plan_ids(grid))

    res = store / "smoke"
    with open(res / "results.csv") as f:
        assert next(csv.reader(f)) == list(RESULTS_COLUMNS)
    rows = read_csv(res / "results.csv")
    # per point: 2 classes x 2 metrics + 3 aggregate rows (fid is nan -> empty value)
    assert collections.Counter(r["point"] for r in rows) == {"p0000": 7, "p0001": 7}
    dm = [r for r in rows if r["point"] == "p0000"]
    gmi = [r for r in rows if r["point"] == "p0001"]
    assert {r["method"] for r in dm} == {"diff_mi"} and {r["method"] for r in gmi} == {"gmi"}
    assert dm[0]["finetune"] == "true" and dm[0]["finetune_layers"] == "2" and dm[0]["pgd"] == "true"
    assert dm[0]["loss"] == "topk_preg" and dm[0]["k"] == "1" and float(dm[0]["alpha"]) == 1.0
    assert all(gmi[0][c] == "" for c in ("finetune", "finetune_layers", "pgd", "loss", "k", "alpha"))
    assert dm[0]["defense"] == "none" and dm[0]["eval_model"] == "small_resnet" and dm[0]["image_size"] == "32"
    agg = {(r["point"], r["metric"]): r["value"] for r in rows if r["class"] == "all"}
    assert agg[("p0000", "psnr")] == "10.5" and agg[("p0000", "fid")] == ""
    assert {r["class"] for r in dm} == {"0", "1", "all"}

    assert read_csv(res / "missing.csv") == [
        {"point": "p0000", "metric": "fid", "reason": "inception weights not available (fake)"},
        {"point": "p0001", "metric": "fid", "reason": "inception weights not available (fake)"}]
    pj = json.loads((res / "points" / "p0000" / "point.json").read_text())
    assert pj["status"] == "done" and pj["method"] == "diff_mi" and pj["axis_values"] == {"method": "diff_mi"}
    assert pj["config"]["diff_mi"]["attack"]["k"] == 1 and pj["stages"]["evaluate"]["done"]
    assert set(pj["stages"]) == {"split", "target", "eval", "pseudo_labels", "prior", "finetune", "attack", "evaluate"}
    assert sorted(os.listdir(res / "points" / "p0000")) == ["change_rates.json", "grid.png", "point.json", "samples.npz"]
    assert sorted(os.listdir(res / "points" / "p0001")) == ["grid.png", "point.json", "samples.npz"]
    with np.load(res / "points" / "p0001" / "samples.npz") as z:
        assert z["recon"].dtype == np.uint8 and z["recon"].ndim == 4
    assert json.loads((res / "failures.json").read_text()) == []
    merged = yaml.safe_load((res / "grid.yaml").read_text())
    assert merged["name"] == "smoke" and merged["axes"] == {"method": ["diff_mi", "gmi"]}
    assert "target" in merged["base"]  # includes resolved

    # the reporting reads exactly this folder
    reporting = pytest.importorskip("diffmi_ray.reporting.results")
    r = reporting.load_results(res)
    assert set(r.points.index) == {"p0000", "p0001"} and set(r.points["status"]) == {"done"}
    assert r.change_rates("p0000")["selected"] == [1, 2] and r.samples("p0001") is not None

    # rerun: nothing is computed again
    assert run_grid(load_grid(grid), local=True) == 0
    assert executions(store) == collections.Counter(plan_ids(grid))
    assert "11 already done" in capsys.readouterr().out


def test_local_failure_marks_dependents_and_rest_completes(tmp_path, fake_stages, capsys):
    fake_stages.setenv("DIFFMI_RAY_FAULT", "fail:train_prior:cdm")
    grid = smoke_grid(tmp_path)
    assert run_grid(load_grid(grid), local=True, resume_command="diffmi-ray run X") == 1
    out = capsys.readouterr().out
    assert "1 done, 1 failed, 0 pending" in out
    assert "p0000 (method=diff_mi): stage train_prior (prior cdm" in out
    assert "StageError: train_prior/" in out and "injected fault" in out
    assert "stage_log: " in out and "failure record (with traceback): " in out and "diffmi-ray run X" in out

    store = tmp_path / "store"
    plan = plan_grid(load_grid(grid))
    roles = next(r for p, r in plan.points if p.point_id == "p0000")
    ex = executions(store)
    # the failed prior ran once; what depends on it never ran; the gmi point ran completely
    assert ex[roles["prior"].id] == 1
    for role in ("finetune", "attack", "evaluate"):
        assert ex[roles[role].id] == 0
    rows = read_csv(store / "smoke" / "results.csv")
    assert {r["point"] for r in rows} == {"p0001"}
    fails = json.loads((store / "smoke" / "failures.json").read_text())
    assert [(f["point"], f["stage"]) for f in fails] == [("p0000", "train_prior")]
    pj = json.loads((store / "smoke" / "points" / "p0000" / "point.json").read_text())
    assert pj["status"] == "failed" and pj["failure"]["stage"] == "train_prior"
    rec = json.loads(Path(fails[0]["record"]).read_text())
    assert "Traceback" in rec["traceback"] and rec["error_type"] == "StageError"
    assert Path(rec["logs"]["stage_log"]).is_file()

    # status reads the failure without Ray
    assert print_status(load_grid(grid)) == 0
    st = capsys.readouterr().out
    assert "train_prior" in st and "1 done, 1 failed, 0 pending" in st and "blocks point p0000" in st

    # fixed: the rerun computes only what is missing and clears the failure record
    fake_stages.delenv("DIFFMI_RAY_FAULT")
    assert run_grid(load_grid(grid), local=True) == 0
    ex2 = executions(store)
    assert ex2[roles["prior"].id] == 2
    assert all(ex2[i] == 1 for i in plan.instances if i != roles["prior"].id)
    assert not Path(fails[0]["record"]).exists()


def test_local_interrupt_then_resume(tmp_path, fake_stages, capsys):
    fake_stages.setenv("DIFFMI_RAY_FAULT", "interrupt:train_prior")
    grid = smoke_grid(tmp_path)
    assert run_grid(load_grid(grid), local=True, resume_command="diffmi-ray run G --storage S") == 130
    out = capsys.readouterr().out
    assert "interrupted" in out and "diffmi-ray run G --storage S" in out
    store = tmp_path / "store"
    before = executions(store)
    assert 0 < len(before) < len(plan_ids(grid))
    fake_stages.delenv("DIFFMI_RAY_FAULT")
    assert run_grid(load_grid(grid), local=True) == 0
    after = executions(store)
    assert all(n == 1 for n in after.values()) and set(after) == plan_ids(grid)


def test_local_run_on_an_fsspec_store(tmp_path, fake_stages, capsys):
    """A non-local storage root (fsspec memory://, standing in for s3://): records, logs, results."""
    import fsspec

    fake_stages.setenv("DIFFMI_RAY_CACHE", str(tmp_path / "cache"))
    fake_stages.setenv("DIFFMI_RAY_FAULT", "fail:attack:gmi")
    root = f"memory://runner-{tmp_path.name}"
    grid = smoke_grid(tmp_path, storage=root)
    assert run_grid(load_grid(grid), local=True) == 1
    assert "1 done, 1 failed, 0 pending" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    rows = list(csv.DictReader(fs.cat_file(f"{root}/smoke/results.csv").decode().splitlines()))
    assert {r["point"] for r in rows} == {"p0000"} and len(rows) == 7
    assert fs.exists(f"{root}/smoke/points/p0000/change_rates.json")
    fails = json.loads(fs.cat_file(f"{root}/smoke/failures.json"))
    assert fails[0]["point"] == "p0001" and "injected fault" in fails[0]["message"]
    assert "injected fault" in fs.cat_file(fails[0]["logs"]["stage_log"]).decode()
    ex = collections.Counter((r["stage"], r["key"]) for r in records.read_executions(ArtifactStore(root)))
    assert len(ex) == len(plan_ids(grid)) - 1 and all(n == 1 for n in ex.values())  # gmi's evaluate never ran
    assert print_status(load_grid(grid)) == 0
    assert "1 done, 1 failed, 0 pending" in capsys.readouterr().out
    fs.rm(root, recursive=True)


def test_stage_errors_reach_the_summary(tmp_path, fake_stages, capsys):
    from diffmi_ray.runner import testing

    STAGE_FNS.update(testing.STAGE_FNS, train_prior=_nan_prior)
    try:
        fake_stages.setenv("DIFFMI_RAY_STAGES", "tests.test_runner")
        assert run_grid(load_grid(smoke_grid(tmp_path)), local=True) == 1
        out = capsys.readouterr().out
        assert "StageError" in out and "generator loss became nan; the run diverged" in out
        assert "0 done, 2 failed" in out

        STAGE_FNS["split"] = _user_error_split
        assert run_grid(load_grid(smoke_grid(tmp_path / "b")), local=True) == 1
        out = capsys.readouterr().out
        # a user error is shown plainly, without its type
        assert "      dataset folder /nowhere/celeba is missing (set data.private.root)" in out
        assert "UserError" not in out
    finally:
        STAGE_FNS.clear()


def test_describe_error_unwraps_ray_wrappers():
    class FakeRayTaskError(Exception):
        def __init__(self, cause):
            super().__init__("Traceback ... ray noise")
            self.cause = cause
            self.traceback_str = "remote traceback"

    class FakeWorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    assert records.describe_error(UserError("no such dataset")) == ("no such dataset", "UserError")
    inner = StageError("train_prior/ab: loss became nan")
    wrapped = FakeRayTaskError(FakeWorkerGroupError({1: ValueError("x"), 0: inner}))
    assert records.describe_error(wrapped) == ("StageError: train_prior/ab: loss became nan", "StageError")
    assert records.format_traceback(wrapped) == "remote traceback"


def test_fault_rules_and_temp_dir_and_progress():
    f = parse_faults("fail:attack:gmi; interrupt:train_prior")
    assert f[0].matches("attack", "abc", "attack gmi") and not f[0].matches("attack", "abc", "attack diff_mi")
    assert f[1].matches("train_prior", "k", "prior cdm") and not f[1].matches("attack", "k", "prior")
    with pytest.raises(UserError, match="bad rule"):
        parse_faults("explode:attack")
    # Ray's session dir name (40 chars) and socket name must fit the 107-char Unix socket limit
    d = short_temp_dir("/a/very/long/storage/root/" + "x" * 200)
    assert len(d) + len("/session_2026-11-27_22-41-11_966123_18464/sockets/plasma_store") < 107
    p = Progress("g", {"split": 1, "attack": 2}, interval=0)
    p.mark_done("split", "k1")
    p.mark_running("attack", "k2", "attack gmi")
    p.mark_running("attack", "k3", "attack gmi")
    p.set_trials(total=2, running=1, waiting=1)
    assert "running:" not in p.render()  # submitted, not started: queued
    assert [ln.split()[1:] for ln in p.render().splitlines() if "attack " in ln] == [["0", "0", "2", "0", "0", "2"]]
    p.mark_started("attack", "k2", "attack gmi")
    text = p.render()
    assert "split" in text and "running: attack k2 (attack gmi)" in text and "trials (attack+evaluate)" in text
    assert [ln.split()[1:] for ln in text.splitlines() if "attack " in ln][0] == ["0", "1", "1", "0", "0", "2"]
    assert "evaluate" not in text.split("trials")[0]


def test_status_without_ray(tmp_path, fake_stages, capsys):
    grid = smoke_grid(tmp_path)
    assert print_status(load_grid(grid)) == 0
    out = capsys.readouterr().out
    assert "0 done, 0 failed, 2 pending" in out and "total" in out
    # status, results and the driver module itself never import Ray (only the Ray backend does)
    code = ("import sys; from diffmi_ray.runner import driver, status, results; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------ through Ray


@pytest.mark.ray
def test_ray_train_job_failed_trial_and_rerun(tmp_path, fake_stages, ray_session, capsys):
    """finetune_cdm as a 2-worker TorchTrainer (DDP all-reduce), a failing attack trial, a rerun."""
    fake_stages.setenv("DIFFMI_RAY_FAULT", "fail:attack:gmi")
    grid = smoke_grid(tmp_path, resources={"finetune_cdm": {"num_workers": 2}, "attack": {"max_retries": 1}})
    t0 = time.time()
    assert run_grid(load_grid(grid)) == 1
    out = capsys.readouterr().out
    assert "Ray joined" in out and "1 done, 1 failed, 0 pending" in out
    assert "p0001 (method=gmi): stage attack (attack gmi" in out and "injected fault" in out
    store = tmp_path / "store"
    plan = plan_grid(load_grid(grid))
    ex = executions(store)
    failed_attack = next(r["attack"] for p, r in plan.points if p.config.method == "gmi").id
    assert ex[failed_attack] == 2  # Tune retried the trial once (max_retries 1)
    assert all(ex[i] == 1 for i in plan.instances if i[0] != "evaluate" and i != failed_attack)
    for stage, key in plan.instances:
        if (stage, key) == failed_attack or stage == "evaluate":
            continue
        m = json.loads((store / "artifacts" / stage / key / "metrics.json").read_text())
        if stage == "finetune_cdm":
            assert m["world_size"] == 2 and m["all_reduce"] == 2.0
            assert (store / "ray" / "train" / f"finetune_cdm-{key}").is_dir()  # named from the key
        elif stage in ("train_prior", "train_classifier"):
            assert m["world_size"] == 1  # num_workers 0: a plain Ray task
    assert {r["point"] for r in read_csv(store / "smoke" / "results.csv")} == {"p0000"}
    print(f"first run {time.time() - t0:.1f}s", file=sys.stderr)

    fake_stages.delenv("DIFFMI_RAY_FAULT")
    assert run_grid(load_grid(grid)) == 0
    ex2 = executions(store)
    assert ex2 - ex == collections.Counter({failed_attack: 1, next(
        r["evaluate"] for p, r in plan.points if p.config.method == "gmi").id: 1})
    assert {r["point"] for r in read_csv(store / "smoke" / "results.csv")} == {"p0000", "p0001"}


@pytest.mark.ray
def test_ray_interrupt_during_trials_then_resume(tmp_path, fake_stages, ray_session, capsys):
    """The split's worker process dies once (Ray retries the task); Ctrl-C during the trials."""
    # evaluate is held back so the interrupt (sent once the attack is seen finished) lands mid-trial
    fake_stages.setenv("DIFFMI_RAY_FAULT", "crash-once:split; interrupt:attack; slow:evaluate")
    grid = smoke_grid(tmp_path)
    assert run_grid(load_grid(grid), resume_command="diffmi-ray run RESUME-ME") == 130
    out = capsys.readouterr().out
    assert "injected interrupt after attack" in out and "Resume with:\n  diffmi-ray run RESUME-ME" in out
    split = [r for r in records.read_executions(ArtifactStore(tmp_path / "store")) if r["stage"] == "split"]
    assert sorted(r["status"] for r in split) == ["ok", "running"]  # the crashed attempt never finished
    store = ArtifactStore(tmp_path / "store")
    done_before = {i for i in plan_ids(grid) if store.is_done(*i)}
    ex = executions(tmp_path / "store")
    fake_stages.delenv("DIFFMI_RAY_FAULT")
    assert run_grid(load_grid(grid)) == 0
    ex2 = executions(tmp_path / "store")
    assert all(ex2[i] == ex[i] for i in done_before)  # nothing finished ran again
    assert all(store.is_done(*i) for i in plan_ids(grid))


@pytest.mark.ray
def test_sigkilled_driver_then_rerun(tmp_path, fake_stages, ray_session):
    """A driver process joined to the running Ray is SIGKILLed mid-grid; the rerun completes it."""
    import ray

    grid = smoke_grid(tmp_path)
    env = dict(os.environ, DIFFMI_RAY_STAGES=FAKE, PYTHONUNBUFFERED="1")
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "diffmi_ray.cli", "run", str(grid), "--address", address],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ArtifactStore(tmp_path / "store")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not store.done_keys("train_prior"):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.done_keys("train_prior"), "the driver made no progress before the deadline"
    done_before = {i for i in plan_ids(grid) if store.is_done(*i)}
    ex = executions(tmp_path / "store")
    assert run_grid(load_grid(grid)) == 0
    ex2 = executions(tmp_path / "store")
    assert all(ex2[i] == ex[i] for i in done_before)
    assert all(store.is_done(*i) for i in plan_ids(grid))
    assert not math.isnan(float(read_csv(tmp_path / "store" / "smoke" / "results.csv")[0]["value"]))

"""``diffmi-ray run``: plan a grid, run its stage DAG on Ray (or in-process), collect the results.

Order of work:

1. Upstream instances (split, classifiers, pseudo-labels, priors, CDM fine-tuning) that are not
   finished yet run as soon as all their parents are finished, so the instances of one wave run in
   parallel (and a later wave starts where its own parents are ready). Training stages with
   ``resources.<stage>.num_workers >= 1`` are Ray Train ``TorchTrainer`` jobs; everything else is a
   Ray task with ``cpus_per_worker`` / ``gpus_per_worker``.
2. Attack + evaluate: one Ray Tune trial per unique attack instance (grid points that share an
   attack share its trial, so no two trials ever compute the same instance); each trial runs the
   attack and then its evaluate instance(s), skipping finished ones.
3. Results of every grid point are collected into ``<storage>/<grid>/`` (see
   :mod:`diffmi_ray.runner.results`), also after failures and interruptions.

Each unique instance is submitted once per run, and finished ones are never submitted: a rerun of
the same command computes only what is missing. A failing instance gets a failure record; every
grid point that depends on it is marked failed, independent points continue. Exit status: 0 all
done, 1 some point failed, 130 interrupted (the summary prints the command that resumes).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from diffmi_ray.config.experiment import STAGES
from diffmi_ray.pipeline.plan import StageInstance, plan_grid
from diffmi_ray.pipeline.store import ArtifactStore
from diffmi_ray.runner import records
from diffmi_ray.runner.execution import WorkerOptions, execute
from diffmi_ray.runner.faults import STAGES_ENV, faults_from_env
from diffmi_ray.runner.progress import Progress, _hms
from diffmi_ray.runner.results import PointState, collect_results

UPSTREAM = ("split", "train_classifier", "pseudo_labels", "train_prior", "finetune_cdm")
TRIAL_STAGES = ("attack", "evaluate")
TRAINING = ("train_classifier", "train_prior", "finetune_cdm")
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def run_grid(loaded, *, address: str | None = None, local: bool = False, num_cpus: int | None = None,
             resume_command: str | None = None) -> int:
    """Run a loaded grid; returns the exit status (0 done, 1 failures, 130 interrupted).

    ``address``: join a running Ray cluster (``auto``); otherwise an embedded local Ray with
    ``num_cpus`` CPUs (default all) is started, unless Ray is already initialised in this process,
    which is then used and left running. ``local``: no Ray at all, every stage in this process.
    """
    return GridRun(loaded, resume_command=resume_command).run(address=address, local=local, num_cpus=num_cpus)


class GridRun:
    """The state of one ``run`` invocation (which instances finished, failed, are blocked)."""

    def __init__(self, loaded, *, resume_command: str | None = None, out=None):
        self.loaded = loaded
        self.grid = loaded.grid
        self.plan = plan_grid(loaded)
        self.store = ArtifactStore(loaded.storage_root)
        self.out = out or sys.stdout
        self.faults = faults_from_env()
        self.interrupt_faults = [f for f in self.faults if f.action == "interrupt"]
        self.resume_command = resume_command or f"diffmi-ray run {loaded.path}"
        self.res = {s: self.grid.stage_resources(s).model_dump() for s in STAGES}
        self.opts = WorkerOptions(storage=self.store.root, device=self.grid.run.device,
                                  torch_threads=self.grid.run.torch_threads,
                                  stage_module=os.environ.get(STAGES_ENV) or None,
                                  faults=[(f.action, f.stage, f.match) for f in self.faults if f.action != "interrupt"])
        self.progress = Progress(self.grid.name, {s: len(v) for s, v in self.plan.by_stage().items()}, out=self.out)
        self.done: set[tuple[str, str]] = set()
        self.failures: dict[tuple[str, str], dict] = {}
        self.blocked: dict[tuple[str, str], tuple[str, str]] = {}
        self.interrupted = False
        self.interrupt_sent = False
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        self.seen_executions: set[str] | None = None

    # ================================================================== entry point
    def run(self, *, address: str | None = None, local: bool = False, num_cpus: int | None = None) -> int:
        t0 = time.time()
        self.scan_started()
        for inst in self.plan.instances.values():
            if self.store.is_done(*inst.id):
                self.done.add(inst.id)
                self.progress.mark_done(*inst.id)
        n, d = len(self.plan.instances), len(self.done)
        print(f"diffmi-ray: grid '{self.grid.name}' from {self.loaded.path}: {len(self.plan.points)} point(s), "
              f"{n} stage instance(s), {d} already done; storage {self.store.root}", file=self.out, flush=True)
        try:
            if local:
                self.opts.echo = True
                self._run_local()
            else:
                self._run_ray(address, num_cpus)
        except KeyboardInterrupt:
            self.interrupted = True
        states, results_dir, report = {}, None, None
        try:
            states = self.point_states()
            results_dir = collect_results(self.loaded, self.plan, self.store, states)
            if any(st.status == "done" for st in states.values()):
                report = self.build_report(results_dir)
        except KeyboardInterrupt:
            self.interrupted = True
        self.scan_started()
        self.progress.tick(force=True)
        return self.summary(states, results_dir, report, time.time() - t0)

    def build_report(self, results_dir: str) -> str | None:
        """Tables, plots and report.html of the results (``DIFFMI_RAY_REPORT=0`` skips this)."""
        if os.environ.get("DIFFMI_RAY_REPORT", "1") == "0":
            return None
        if not self.store.local:
            return f"not built here (remote storage); fetch {results_dir} and run `diffmi-ray report FOLDER`"
        try:
            from diffmi_ray.reporting import build_report

            return str(build_report(results_dir).html)
        except Exception as e:  # noqa: BLE001 - the results are complete; the report can be rebuilt
            return f"not built ({records.describe_error(e)[0]}); retry with `diffmi-ray report {results_dir}`"

    # ================================================================== bookkeeping
    def finished(self, inst: StageInstance, *, may_interrupt: bool = True) -> None:
        self.done.add(inst.id)
        self.failures.pop(inst.id, None)
        self.progress.mark_done(*inst.id)
        if may_interrupt:
            self.maybe_interrupt(inst)

    def scan_started(self) -> None:
        """Mark instances whose execution record appeared since the last scan as started (one
        listing of ``executions/``; the file names carry stage and key)."""
        base = f"{self.store.root}/{records.EXECUTIONS}"
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.store.fs.ls(base, detail=False)} \
                if self.store.fs.exists(base) else set()
        except OSError:
            return
        if self.seen_executions is None:  # first scan: records of earlier runs
            self.seen_executions = names
            return
        for name in names - self.seen_executions:
            parts = name.split("-")
            inst = self.plan.instances.get((parts[0], parts[1])) if len(parts) == 3 else None
            if inst is not None and inst.id not in self.done:
                self.progress.mark_started(inst.stage, inst.key, inst.label)
        self.seen_executions |= names

    def tick(self) -> None:
        if self.progress.due():
            self.scan_started()
            self.progress.tick(force=True)

    def maybe_interrupt(self, inst: StageInstance) -> None:
        """Test hook: Ctrl-C ourselves once a matching instance is finished (DIFFMI_RAY_FAULT=interrupt:...)."""
        if not self.interrupt_sent and any(f.matches(inst.stage, inst.key, inst.label) for f in self.interrupt_faults):
            self.interrupt_sent = True
            print(f"diffmi-ray: injected interrupt after {inst.stage} {inst.key[:8]}", file=self.out, flush=True)
            signal.raise_signal(signal.SIGINT)

    def failed(self, inst: StageInstance, exc: BaseException) -> dict:
        """Record the failure of ``inst`` (the worker's record if it wrote one in this run)."""
        rec = records.read_failure(self.store, inst.stage, inst.key)
        if rec is None or str(rec.get("time", "")) < self.started:
            logs = {"stage_log": records.log_path(self.store, inst.stage, inst.key)}
            logs.update(ray_logs_hint())
            rec = records.failure_record(inst.stage, inst.key, inst.label, exc, logs=logs)
            records.write_failure(self.store, rec)
        rec["record"] = records.failure_path(self.store, inst.stage, inst.key)
        self.failures[inst.id] = rec
        self.progress.mark_failed(*inst.id)
        return rec

    def propagate_blocked(self, todo: dict) -> None:
        """Instances below a failure cannot run: mark them blocked (their points fail)."""
        changed = True
        while changed:
            changed = False
            for iid, inst in list(todo.items()):
                for p in inst.parents.values():
                    root = p if p in self.failures else self.blocked.get(p)
                    if root is not None:
                        self.blocked[iid] = root
                        self.progress.mark_failed(*iid)
                        del todo[iid]
                        changed = True
                        break

    # ================================================================== upstream stages
    def run_upstream(self, backend) -> None:
        todo = {i.id: i for i in self.plan.instances.values() if i.stage in UPSTREAM and i.id not in self.done}
        running: dict = {}
        try:
            while True:
                self.propagate_blocked(todo)
                for iid, inst in list(todo.items()):
                    if all(p in self.done for p in inst.parents.values()):
                        del todo[iid]
                        self.progress.mark_running(inst.stage, inst.key, inst.label)
                        running[backend.submit(inst)] = inst
                if not running:
                    break
                for h in backend.wait(list(running), self.progress.interval):
                    inst = running.pop(h)
                    try:
                        backend.result(h)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # noqa: BLE001 - recorded; dependents are blocked
                        self.failed(inst, e)
                    else:
                        self.finished(inst)
                self.tick()
        except KeyboardInterrupt:
            backend.cancel(list(running))
            raise

    # ================================================================== attack + evaluate
    def trial_groups(self) -> dict[str, dict]:
        """Unique attack instances still to do, with their evaluate instances and grid points."""
        groups: dict[str, dict] = {}
        for point, roles in self.plan.points:
            if any(i.id not in self.done for i in roles.values() if i.stage in UPSTREAM):
                continue  # an upstream instance failed (or was not reached)
            a, e = roles["attack"], roles["evaluate"]
            if e.id in self.done:
                continue
            g = groups.setdefault(a.key, {"attack": a.to_dict(), "evaluate": [], "points": []})
            if all(x["key"] != e.key for x in g["evaluate"]):
                g["evaluate"].append(e.to_dict())
            g["points"].append(point.point_id)
        return groups

    def settle_group(self, group: dict, error: BaseException | None) -> None:
        """After a trial: mark its instances finished, failed (first unfinished one) or unfinished."""
        for d in [group["attack"], *group["evaluate"]]:
            inst = StageInstance.from_dict(d)
            if self.store.is_done(*inst.id):
                if inst.id not in self.done:
                    self.finished(inst, may_interrupt=False)
            elif error is not None:
                self.failed(inst, error)
                return
            else:
                self.interrupted = True  # the trial was stopped before it finished
                return

    def _run_local(self) -> None:
        backend = LocalBackend(self.opts, self.res)
        self.run_upstream(backend)
        groups = self.trial_groups()
        self.progress.set_trials(total=len(groups), waiting=len(groups))
        for n, group in enumerate(groups.values()):
            self.progress.set_trials(running=1, waiting=len(groups) - n - 1)
            error = None
            for d in [group["attack"], *group["evaluate"]]:
                inst = StageInstance.from_dict(d)
                if inst.id in self.done:
                    continue
                self.progress.mark_running(inst.stage, inst.key, inst.label)
                try:
                    execute(inst, self.opts, resources=self.res[inst.stage])
                except Exception as e:  # noqa: BLE001
                    error = e
                    break
                self.finished(inst)
                self.tick()
            self.settle_group(group, error)
            key = "failed" if error else "done"
            self.progress.set_trials(running=0, **{key: self.progress.trials[key] + 1})

    def _run_ray(self, address: str | None, num_cpus: int | None) -> None:
        from diffmi_ray.runner.ray_backend import RayBackend, run_trials
        from diffmi_ray.runner.session import check_feasible, ray_session

        log_to_driver = os.environ.get("DIFFMI_RAY_LOG_TO_DRIVER", "0") == "1"
        with ray_session(self.store.root, address=address, num_cpus=num_cpus, log_to_driver=log_to_driver) as sess:
            needed = {i.stage for i in self.plan.instances.values() if i.id not in self.done}
            check_feasible(sess, {s: self.res[s] for s in needed})
            res = sess.resources
            print(f"diffmi-ray: Ray {sess.kind} ({res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, "
                  f"{sess.trial_drivers} trial drivers)" + (f", temp dir {sess.temp_dir}" if sess.temp_dir else ""),
                  file=self.out, flush=True)
            self.run_upstream(RayBackend(self))
            groups = self.trial_groups()
            if groups:
                run_trials(self, groups)

    # ================================================================== results
    def point_states(self) -> dict[str, PointState]:
        states = {}
        for point, roles in self.plan.points:
            ev = roles["evaluate"]
            if self.store.is_done(*ev.id):
                states[point.point_id] = PointState("done")
                continue
            root = None
            for inst in sorted(roles.values(), key=lambda i: STAGES.index(i.stage)):
                if inst.id in self.failures:
                    root = inst.id
                elif inst.id in self.blocked:
                    root = self.blocked[inst.id]
                if root:
                    break
            if root is None:
                states[point.point_id] = PointState("pending")
                continue
            rec = self.failures[root]
            states[point.point_id] = PointState("failed", {
                "stage": rec["stage"], "key": rec["key"], "label": rec.get("label", ""), "message": rec["message"],
                "error_type": rec.get("error_type", ""), "logs": rec.get("logs", {}), "record": rec.get("record")})
        return states

    def summary(self, states: dict[str, PointState], results_dir: str | None, report: str | None,
                seconds: float) -> int:
        p = print
        counts = {s: sum(1 for st in states.values() if st.status == s) for s in ("done", "failed", "pending")}
        p(f"\ndiffmi-ray: grid '{self.grid.name}': {len(self.plan.points)} point(s): {counts['done']} done, "
          f"{counts['failed']} failed, {counts['pending']} pending  [{_hms(seconds)}]", file=self.out)
        if results_dir:
            p(f"results: {results_dir}/results.csv", file=self.out)
        if report:
            p(f"report: {report}", file=self.out)
        failed = [(pid, st) for pid, st in states.items() if st.status == "failed"]
        if failed:
            p(f"\nFAILED grid points ({len(failed)}):", file=self.out)
            for pid, st in failed:
                f = st.failure
                point = next(pt for pt, _ in self.plan.points if pt.point_id == pid)
                axes = ", ".join(f"{k}={v}" for k, v in point.axis_values.items())
                p(f"  {pid} ({axes or point.config.method}): stage {f['stage']} ({f['label']}, key {f['key'][:8]}) "
                  f"failed:", file=self.out)
                for line in str(f["message"]).splitlines() or [""]:
                    p(f"      {line}", file=self.out)
                for name, where in (f.get("logs") or {}).items():
                    p(f"    {name}: {where}", file=self.out)
                if f.get("record"):
                    p(f"    failure record (with traceback): {f['record']}", file=self.out)
        if self.interrupted:
            p(f"\ninterrupted: finished work is kept. Resume with:\n  {self.resume_command}", file=self.out,
              flush=True)
            return EXIT_INTERRUPTED
        if failed:
            p(f"\nfix the cause, then rerun the same command to retry only what is missing:\n  {self.resume_command}",
              file=self.out, flush=True)
            return EXIT_FAILED
        if counts["pending"]:
            p("some points are still pending (see above)", file=self.out, flush=True)
            return EXIT_FAILED
        self.out.flush()
        return EXIT_OK


class LocalBackend:
    """Runs each submitted instance immediately in this process (``--local``)."""

    def __init__(self, opts: WorkerOptions, res: dict):
        self.opts, self.res = opts, res
        self.outcomes: dict[int, tuple[bool, object]] = {}

    def submit(self, inst: StageInstance) -> int:
        h = len(self.outcomes)
        try:
            self.outcomes[h] = (True, execute(inst, self.opts, resources=self.res[inst.stage]))
        except Exception as e:  # noqa: BLE001 - handed back by result()
            self.outcomes[h] = (False, e)
        return h

    def wait(self, handles: list, timeout: float) -> list:
        return handles

    def result(self, h: int):
        ok, value = self.outcomes.pop(h)
        if not ok:
            raise value
        return value

    def cancel(self, handles: list) -> None:
        pass


def ray_logs_hint() -> dict:
    """Where this Ray session keeps its logs (only if Ray is running in this process)."""
    if "ray" not in sys.modules:
        return {}
    try:
        import ray

        node = ray._private.worker.global_worker.node  # noqa: SLF001 - no public API for the path
        return {"ray_logs": f"{node.get_logs_dir_path()} (on {ray.util.get_node_ip_address()})"}
    except Exception:  # noqa: BLE001 - a hint only
        return {}

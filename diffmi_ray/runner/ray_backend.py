"""Driver-side Ray plumbing: submit upstream instances, run the attack trials with Ray Tune."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import ray
from ray import tune

from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.runner.ray_jobs import TRIAL_DRIVER, attack_trial, stage_task, task_options, train_driver

TRAINING = ("train_classifier", "train_prior", "finetune_cdm")


class RayBackend:
    """Upstream instances as Ray tasks, or as Ray Train jobs for training stages with workers."""

    def __init__(self, run):
        self.opts = run.opts.to_dict()
        self.res = run.res
        self.train_storage = f"{run.store.root}/ray/train"

    def submit(self, inst: StageInstance):
        d, r = inst.to_dict(), self.res[inst.stage]
        if inst.stage in TRAINING and r["num_workers"] >= 1:
            # Retries happen inside Ray Train (FailureConfig); the driver itself holds no CPU.
            return train_driver.options(resources={TRIAL_DRIVER: 1}, max_retries=0,
                                        name=f"train:{inst.stage}:{inst.key[:8]}").remote(d, self.opts, r,
                                                                                          self.train_storage)
        return stage_task.options(**task_options(inst.stage, inst.key, r, retries=r["max_retries"])).remote(
            d, self.opts, r)

    def wait(self, handles: list, timeout: float) -> list:
        ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def result(self, h):
        return ray.get(h)

    def cancel(self, handles: list) -> None:
        for h in handles:
            try:
                ray.cancel(h, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass


class _DriverHooks(tune.Callback):
    """Progress view and the interrupt test hook while ``tuner.fit()`` runs (in the driver)."""

    def __init__(self, run, groups: dict):
        self.run = run
        self.insts = [StageInstance.from_dict(d) for g in groups.values() for d in [g["attack"], *g["evaluate"]]]
        self.total = len(groups)
        self.last_poll = 0.0

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state; the live one stays here
        return {"run": None, "insts": [], "total": self.total, "last_poll": 0.0}

    def on_step_end(self, iteration, trials, **info):
        import time

        if self.run is None:
            return

        counts = {"PENDING": 0, "RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PAUSED": 0}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        self.run.progress.set_trials(total=self.total, done=counts["TERMINATED"], failed=counts["ERROR"],
                                     running=counts["RUNNING"],
                                     waiting=counts["PENDING"] + counts["PAUSED"])
        now = time.time()
        if now - self.last_poll >= min(2.0, self.run.progress.interval):
            self.last_poll = now
            self.run.scan_started()
            for inst in self.insts:
                if inst.id not in self.run.done and self.run.store.is_done(*inst.id):
                    self.run.done.add(inst.id)
                    self.run.progress.mark_done(*inst.id)
                    if not self.run.interrupt_sent and any(f.matches(inst.stage, inst.key, inst.label)
                                                           for f in self.run.interrupt_faults):
                        self.run.interrupt_sent = True
                        print(f"diffmi-ray: injected interrupt after {inst.stage} {inst.key[:8]}",
                              file=self.run.out, flush=True)
                        signal.raise_signal(signal.SIGINT)  # as Ctrl-C: _sigint_stops_tune
        self.run.tick()


@contextlib.contextmanager
def _quiet_tune():
    """Tune prints its own tables and logs each trial error with a traceback; the driver's progress
    view (written to the stream it was given, not to ``sys.stdout``) and its failure summary and
    records replace them."""
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _sigint_stops_tune(run):
    """Ctrl-C during ``tuner.fit()``: remember it, and let Tune stop the experiment gracefully.

    Tune's own SIGINT handler stops the run but leaves no trace of the interruption, so it is
    disabled; ours records it and raises SIGUSR1, which Tune treats as the same stop request.
    """
    old_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    old_int, old_usr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)

    def on_sigint(signum, frame):
        run.interrupted = True
        signal.signal(signal.SIGINT, old_int)  # a second Ctrl-C interrupts at once
        print("diffmi-ray: interrupt received, stopping the trials (Ctrl-C again to abort at once)",
              file=run.out, flush=True)
        signal.raise_signal(signal.SIGUSR1)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGUSR1, old_usr1)
        if old_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = old_env


def run_trials(run, groups: dict) -> None:
    """One Tune trial per unique attack instance; settles every group's instances afterwards.

    ``tuner.fit()`` neither raises on failed trials nor on Ctrl-C (Tune stops the experiment and
    returns): failed trials are read from the result grid, and a trial that neither finished nor
    failed means the run was interrupted.
    """
    res_a, res_e = run.res["attack"], run.res["evaluate"]
    experiment = f"{run.grid.name}-attack"
    storage = f"{run.store.root}/ray/tune"
    path = f"{storage}/{experiment}"
    if run.store.fs.exists(path):  # the state of an earlier invocation; trials are idempotent anyway
        run.store.fs.rm(path, recursive=True)
    trainable = tune.with_resources(
        tune.with_parameters(attack_trial, groups=groups, opts=run.opts.to_dict(), resources=run.res),
        {TRIAL_DRIVER: 1})
    max_conc = run.grid.run.max_concurrent_trials or None
    tuner = tune.Tuner(
        trainable,
        param_space={"group": tune.grid_search(sorted(groups))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_conc, reuse_actors=True,
                                    trial_name_creator=lambda t: f"attack-{t.config['group'][:8]}",
                                    trial_dirname_creator=lambda t: f"attack-{t.config['group']}"),
        run_config=tune.RunConfig(
            name=experiment, storage_path=storage, verbose=0, callbacks=[_DriverHooks(run, groups)],
            failure_config=tune.FailureConfig(max_failures=max(res_a["max_retries"], res_e["max_retries"]))))
    run.progress.set_trials(total=len(groups), waiting=len(groups))
    with _sigint_stops_tune(run), _quiet_tune():
        result_grid = tuner.fit()
    errors = {}
    for r in result_grid:
        key = (r.config or {}).get("group")
        if key is not None:
            errors[key] = r.error
    for key, group in groups.items():
        run.settle_group(group, errors.get(key))

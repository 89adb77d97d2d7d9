"""The Ray side of the runner: stage tasks, Ray Train jobs and the Tune trial of an attack.

Three layers, as in Ray's own Train+Tune examples:

* :func:`train_loop` runs once per Ray Train worker (``torch.distributed`` is set up by Ray Train);
* :func:`train_driver` is a small task that builds and fits the ``TorchTrainer`` of one training
  stage instance; like a Tune trial it holds only the custom resource ``trial_driver`` (no CPU), so
  drivers never take the CPUs/GPUs their own workers need (RAY.md trap 1);
* :func:`attack_trial` is the Tune trial of one attack instance: it runs the attack and then its
  evaluate instance(s) as Ray tasks with the stages' configured resources and reports the metrics.
"""

from __future__ import annotations

import os

import ray
from ray import tune

from diffmi_ray.runner.execution import execute

TRIAL_DRIVER = "trial_driver"


def log_hint() -> dict:
    """Where this Ray worker's own stdout/stderr go (``node-ip:logs-dir/worker-*-<pid>.out``)."""
    try:
        node = ray._private.worker.global_worker.node  # noqa: SLF001 - no public API for the path
        return {"ray_worker_log": f"{ray.util.get_node_ip_address()}:{node.get_logs_dir_path()}/"
                                  f"worker-*-{os.getpid()}.out (and .err)"}
    except Exception:  # noqa: BLE001 - a hint only
        return {}


def task_options(stage: str, key: str, res: dict, *, retries: int) -> dict:
    """Ray task options of a non-distributed stage instance.

    ``scheduling_strategy="DEFAULT"`` keeps tasks launched from a Tune trial out of the trial's
    placement group (which holds only the ``trial_driver`` resource).
    """
    return {"num_cpus": res["cpus_per_worker"], "num_gpus": res["gpus_per_worker"], "max_retries": retries,
            "retry_exceptions": retries > 0, "name": f"{stage}:{key[:8]}", "scheduling_strategy": "DEFAULT"}


@ray.remote
def stage_task(inst: dict, opts: dict, res: dict) -> dict:
    """One stage instance in a Ray task (non-training stages, and training stages with 0 workers)."""
    return execute(inst, opts, resources=res, log_hint=log_hint())


def train_loop(config: dict) -> None:
    """Per-worker loop of a training stage: every rank runs the stage; rank 0 commits."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    res = config["resources"]
    device = ray.train.torch.get_device() if res["gpus_per_worker"] > 0 else None
    opts = dict(config["opts"])
    if device is not None:
        opts["device"] = str(device)
    metrics = execute(config["inst"], opts, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                      resources=res, log_hint=log_hint())
    ray.train.report({"done": 1, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def train_run_name(inst: dict) -> str:
    """Ray Train run name of an instance: from its key only, so a restarted run resumes it."""
    return f"{inst['stage']}-{inst['key']}"


@ray.remote(num_cpus=0)
def train_driver(inst: dict, opts: dict, res: dict, storage_path: str) -> dict:
    """Fit the ``TorchTrainer`` of one training stage instance; returns the committed metrics."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # stages use absolute paths; keep the cwd
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from diffmi_ray.pipeline.execute import read_metrics
    from diffmi_ray.pipeline.plan import StageInstance
    from diffmi_ray.pipeline.store import ArtifactStore

    per_worker = {"CPU": res["cpus_per_worker"]}
    if res["gpus_per_worker"] > 0:
        per_worker["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"inst": inst, "opts": opts, "resources": res},
        scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["gpus_per_worker"] > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=train_run_name(inst), storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=res["max_retries"])))
    trainer.fit()  # raises TrainingFailedError once the retries are spent
    store = ArtifactStore(opts["storage"])
    si = StageInstance.from_dict(inst)
    if not store.is_done(si.stage, si.key):
        raise RuntimeError(f"{si.stage}/{si.key}: Ray Train finished but the artifact was not committed")
    return read_metrics(store, si)


def attack_trial(config: dict, groups: dict | None = None, opts: dict | None = None,
                 resources: dict | None = None) -> None:
    """Tune trial of one attack instance: the attack, then each of its evaluate instances.

    Each runs as a Ray task with its stage's resources; finished instances are skipped, so a
    retried trial continues where the failed attempt stopped. Reports the (last) evaluate metrics.
    """
    from diffmi_ray.pipeline.store import ArtifactStore

    group = groups[config["group"]]
    store = ArtifactStore(opts["storage"])
    metrics: dict = {}
    for inst in [group["attack"], *group["evaluate"]]:
        if store.is_done(inst["stage"], inst["key"]):
            continue
        res = resources[inst["stage"]]
        ref = stage_task.options(**task_options(inst["stage"], inst["key"], res, retries=0)).remote(inst, opts, res)
        metrics = ray.get(ref)
    tune.report({"group": config["group"], "points": len(group["points"]),
                 **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})

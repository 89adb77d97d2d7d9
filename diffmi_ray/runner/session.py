"""Ray session of a run: join one that is already initialised in this process, connect to a
cluster (``--address``), or start an embedded local Ray sized to the machine.

The embedded Ray gets its own short temp dir under ``/tmp/diffmi-ray-<uid>/`` (Unix socket paths
must stay under 107 characters, and every Ray instance shares ``/tmp/ray`` otherwise), no
dashboard, no usage stats, and ``trial_driver`` custom resources for the trial and Train drivers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass

from diffmi_ray.errors import UserError

TRIAL_DRIVER = "trial_driver"
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_COLOR_PREFIX": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0",
             "RAY_TRAIN_V2_ENABLED": "1"}


@dataclass
class Session:
    kind: str  # "joined" (already initialised here), "cluster" (--address) or "embedded"
    address: str | None
    resources: dict
    temp_dir: str | None = None

    @property
    def trial_drivers(self) -> int:
        return int(self.resources.get(TRIAL_DRIVER, 0))


def short_temp_dir(storage_root: str) -> str:
    """A per-storage temp dir short enough for Ray's socket paths."""
    base = tempfile.gettempdir()
    if len(base) > 20:
        base = "/tmp"
    tag = hashlib.sha256(storage_root.encode()).hexdigest()[:8]
    return os.path.join(base, f"diffmi-ray-{os.getuid()}", tag)


@contextlib.contextmanager
def ray_session(storage_root: str, *, address: str | None = None, num_cpus: int | None = None,
                log_to_driver: bool = False):
    """Yield a :class:`Session`; shut down only what this call started or connected."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        yield _check(Session("joined", None, ray.cluster_resources()))
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
        sess = Session("cluster", address, ray.cluster_resources())
    else:
        cpus = num_cpus or os.cpu_count() or 1
        temp = short_temp_dir(storage_root)
        os.makedirs(temp, exist_ok=True)
        ray.init(num_cpus=cpus, resources={TRIAL_DRIVER: max(2, cpus)}, include_dashboard=False, _temp_dir=temp,
                 log_to_driver=log_to_driver, configure_logging=False)
        sess = Session("embedded", None, ray.cluster_resources(), temp)
    try:
        yield _check(sess)
    finally:
        ray.shutdown()


def _check(sess: Session) -> Session:
    if sess.trial_drivers < 1:
        raise UserError(f"the Ray cluster has no '{TRIAL_DRIVER}' resource, which trial and Train drivers need "
                        "so they never take their workers' CPUs; start the head node with "
                        f"--resources='{{\"{TRIAL_DRIVER}\": 8}}' (cluster.yaml does this)")
    return sess


def check_feasible(sess: Session, needs: dict[str, dict]) -> None:
    """On an embedded Ray (fixed size), fail early on a stage that could never be scheduled."""
    if sess.kind == "cluster":
        return  # an autoscaling cluster may add the nodes later
    cpus, gpus = sess.resources.get("CPU", 0), sess.resources.get("GPU", 0)
    for stage, r in needs.items():
        if r["cpus_per_worker"] > cpus or r["gpus_per_worker"] > gpus:
            raise UserError(f"resources.{stage}: needs {r['cpus_per_worker']} CPU / {r['gpus_per_worker']} GPU per "
                            f"worker, but this Ray has {cpus} CPU / {gpus} GPU in total")
        if r["num_workers"] >= 1 and r["num_workers"] * r["cpus_per_worker"] > cpus:
            raise UserError(f"resources.{stage}: {r['num_workers']} workers x {r['cpus_per_worker']} CPU do not fit "
                            f"in this Ray's {cpus} CPUs")

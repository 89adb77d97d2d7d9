"""Shared test fixtures: quiet Ray settings, one session-scoped Ray, grid-file helpers."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_COLOR_PREFIX", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# The runner tests inject a Ctrl-C (SIGINT) and expect KeyboardInterrupt. A shell starting pytest in
# the background (`cmd &`, nohup) sets SIGINT to "ignore", which Python then keeps: restore Python's
# handler so those tests do not depend on how the suite was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared reference folder not found at {SHARED}")
    return SHARED


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: on a shared 2-core machine more threads only contend
    (and get many times slower). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def write_grid(tmp_path):
    """write_grid(text, name='grid.yaml') -> Path: a grid file in tmp_path (storage defaults to tmp_path)."""

    def _write(text: str, name: str = "grid.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return _write


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One embedded Ray for the whole test session (start-up costs seconds), isolated temp dir."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, resources={"trial_driver": 8}, include_dashboard=False, _temp_dir=str(tmp),
             log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()

"""report.html opens in a real browser: headless Chromium (Debian's ``chromium``) takes a screenshot.

Built from the standard-setting part of the results fixture (10 points) to stay fast. Skips, with
the reason, where /usr/bin/chromium is not installed (``.ci/run`` installs it, so CI runs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from diffmi_ray.reporting import build_report

FIXTURE = Path(__file__).parent / "fixtures" / "results_small"
CHROMIUM = Path("/usr/bin/chromium")
STANDARD = [f"p{i:04d}" for i in range(10)]


def _standard_subset(dst: Path) -> Path:
    """A results folder with only the fixture's standard-setting points."""
    (dst / "points").mkdir(parents=True)
    for p in STANDARD:
        shutil.copytree(FIXTURE / "points" / p, dst / "points" / p)
    df = pd.read_csv(FIXTURE / "results.csv", dtype=str, keep_default_na=False)
    df[df["point"].isin(STANDARD)].to_csv(dst / "results.csv", index=False)
    shutil.copy(FIXTURE / "grid.yaml", dst / "grid.yaml")
    return dst


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return build_report(_standard_subset(tmp_path_factory.mktemp("subset") / "small"))


def test_subset_report_has_its_tables(index):
    assert {"table_I", "table_III", "table_V"} <= set(index.tables)
    assert "table_X" in index.skipped and "fig6c_k" in index.skipped
    page = index.html.read_text()
    assert 'id="table_V_paper"' in page and "Not drawn" in page


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="headless screenshot test needs Debian's chromium at "
                    "/usr/bin/chromium (apt-get install -y chromium; .ci/run installs it)")
def test_report_html_screenshot_in_headless_chromium(index, tmp_path):
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,2000",
               index.html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank page compresses to a few kB; tables and figures make it far larger.
    assert len(data) > 50_000, len(data)

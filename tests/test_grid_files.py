"""Every grid file in grids/ validates and plans, so none can rot.

Paper-scale grids read real dataset folders; here they point ($DIFFMI_DATA) at tiny fake folders
in the real layouts (built with the dataset tests' helpers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffmi_ray.cli import main
from diffmi_ray.config.loader import load_grid
from diffmi_ray.pipeline.plan import plan_grid
from tests.test_data_folders import (_save, make_celeba, make_celeba_hd, make_chestxray, make_chexpert, make_cub,
                                     make_ffhq)

GRIDS = Path(__file__).resolve().parents[1] / "grids"
ALL = sorted(p for p in GRIDS.rglob("*.yaml") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    celeba = make_celeba(root / "celeba")
    (celeba / "private_1000ids.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 1\n")
    (celeba / "ganset.txt").write_text("000005.jpg\n000006.jpg\n")
    make_ffhq(root / "ffhq" / "thumbnails128x128")  # the official FFHQ layout
    make_ffhq(root / "ffhq" / "images1024x1024", n=2)
    make_celeba_hd(root / "celeba_hd")
    for i in range(2):
        _save(str(root / "facescrub" / "Al_A" / f"a{i}.png"), (64, 64), (5, 5, 59, 59))
    make_cub(root / "CUB_200_2011")
    make_chestxray(root / "chestxray")
    make_chexpert(root / "chexpert")
    return root


@pytest.mark.parametrize("grid", ALL, ids=[str(p.relative_to(GRIDS)) for p in ALL])
def test_grid_file_plans(grid, fake_data, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIFFMI_DATA", str(fake_data))
    monkeypatch.setenv("DIFFMI_STORAGE", str(tmp_path / "store"))
    loaded = load_grid(grid)
    assert loaded.points, f"{grid} has no grid points"
    plan = plan_grid(loaded)
    by = plan.by_stage()
    assert len(by["attack"]) >= 1 and len(by["evaluate"]) == len({r["evaluate"].key for _, r in plan.points})
    assert main(["plan", str(grid), "--storage", str(tmp_path / "store")]) == 0
    assert "stage instances" in capsys.readouterr().out


def test_paper_tables_share_stages(fake_data, monkeypatch):
    """Table III re-uses Tables I and II: its stage keys are exactly their union."""
    monkeypatch.setenv("DIFFMI_DATA", str(fake_data))
    keys = {}
    for name in ("table1", "table2", "table3"):
        keys[name] = set(plan_grid(load_grid(GRIDS / "paper" / f"{name}.yaml")).instances)
    assert keys["table3"] == keys["table1"] | keys["table2"]


def test_plan_estimates_gpu_hours(fake_data, monkeypatch, tmp_path, capsys):
    """`plan --gpu-hours` prints the estimate of what is left to run (paper Table I: tens of GPU-hours)."""
    monkeypatch.setenv("DIFFMI_DATA", str(fake_data))
    assert main(["plan", str(GRIDS / "paper" / "table1.yaml"), "--storage", str(tmp_path), "--gpu-hours", "40"]) == 0
    out = capsys.readouterr().out
    total = float(out.strip().splitlines()[-1].split()[-1])
    assert "estimated GPU-hours" in out and 10 < total < 1000, out

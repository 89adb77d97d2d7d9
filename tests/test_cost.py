"""The FLOP / GPU-hour estimator (diffmi_ray.cost): exact counts, linear formulas, every grid estimates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffmi_ray import cost
from diffmi_ray.config.experiment import STAGES
from tests.test_grid_files import fake_data  # noqa: F401  (fixture: tiny fake dataset folders)

torch.set_num_threads(1)

GRIDS = Path(__file__).resolve().parents[1] / "grids"
PAPER = sorted(p for p in (GRIDS / "paper").glob("*.yaml") if not p.name.startswith("_"))


def _stack() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))


def test_flop_count_of_a_known_stack_is_exact():
    # conv: 2 * (3*3*3) MACs per output * 8 channels * 16*16 positions; linear: 2 * 2048 * 10
    hand = 2 * 27 * 8 * 256 + 2 * 2048 * 10
    assert hand == 151_552

    def fwd(m, dev):
        with torch.no_grad():
            m(torch.randn(1, 3, 16, 16, device=dev))

    assert cost.count_flops(_stack, fwd) == 151_552
    # a batch of 4 is 4x, on the meta device and on real tensors alike
    assert cost.count_flops(_stack, lambda m, dev: m(torch.randn(4, 3, 16, 16, device=dev))) == 4 * 151_552


def test_backward_factors_match_counted_backward():
    """BACKWARD_FACTOR (training) and INPUT_GRAD_FACTOR (frozen, gradient to the input) against a counted
    backward of a registry classifier."""
    net = cost.classifier_net({"model": "small_resnet", "model_kwargs": {"width": 8}}, 32, 1, 10)
    fwd = cost.forward_flops(net)

    def step(frozen: bool):
        def run(m, dev):
            for p in m.parameters():
                p.requires_grad_(not frozen)
            x = torch.randn(2, 1, 32, 32, device=dev, requires_grad=frozen)
            m(x).pow(2).mean().backward()
        return (cost.count_flops(lambda: cost._build(net), run) / 2 - fwd) / fwd

    assert step(False) == pytest.approx(cost.BACKWARD_FACTOR, rel=0.05)
    assert step(True) == pytest.approx(cost.INPUT_GRAD_FACTOR, rel=0.05)


TINY_PRIOR = {"unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                       "attention_resolutions": [16], "num_heads": 1}, "iterations": 10, "batch_size": 8}


def test_cdm_prior_is_iterations_x_batch_training_passes():
    unet = cost.cdm_unet_net(TINY_PRIOR, 32, 1, 3)
    f = lambda **kw: sum(t.flops for t in cost.cdm_prior_terms({**TINY_PRIOR, **kw}, 32, 1, 3, 100))  # noqa: E731
    assert f() == 10 * 8 * (1 + cost.BACKWARD_FACTOR) * cost.forward_flops(unet)
    assert f(iterations=20) == 2 * f()
    assert f(batch_size=24) == 3 * f()


def test_finetune_and_classifier_scale_linearly():
    unet = cost.cdm_unet_net(TINY_PRIOR, 32, 1, 6)
    target = cost.classifier_net({"model": "small_cnn", "model_kwargs": {"width": 8}}, 32, 1, 6)
    ft = {"layers": [2, 4], "sampler_steps": 4, "batch_size": 2, "classes": 6, "max_epochs": 3}
    f = lambda **kw: sum(t.flops for t in cost.finetune_terms({**ft, **kw}, unet, target))  # noqa: E731
    assert f(max_epochs=6) == 2 * f()
    # 6 classes in batches of 2 or 3: 3 or 2 steps of 2 or 3 samples -> same work per epoch
    assert f(batch_size=3) == pytest.approx(f())
    # pinned: 3 epochs x 3 steps x (4 solver steps x 2 CFG passes x 2 samples) U-Net examples at
    # fwd + input-grad backward + checkpoint recompute, and T on 2 copies x 3 loss targets (d_2, d_3 and
    # the sample: the official rule at 4 steps) x 2 samples
    expect = (9 * 4 * 2 * 2 * (2 + cost.INPUT_GRAD_FACTOR) * cost.forward_flops(unet)
              + 9 * 2 * 3 * 2 * (1 + cost.INPUT_GRAD_FACTOR) * cost.forward_flops(target))
    assert f() == pytest.approx(expect)

    sizes = cost.DataSizes(classes=6, train=100, test=10, public=50, source="test")
    g = lambda e: sum(t.flops for t in cost.classifier_terms(  # noqa: E731
        {"model": "small_cnn", "model_kwargs": {"width": 8}, "train": {"epochs": e}}, 32, 1, sizes))
    assert g(3) - g(2) == pytest.approx(g(2) - g(1))  # affine in epochs (the final train-accuracy pass is fixed)
    assert g(2) - g(1) == pytest.approx((100 * (1 + cost.BACKWARD_FACTOR) + 10) * cost.forward_flops(target))


def test_smoke_grid_estimate_sums_and_covers_every_stage():
    df, per, total = cost.estimate_grid(GRIDS / "smoke.yaml", sustained_tflops=10.0)
    assert list(per["stage"]) == list(STAGES)
    for stage in STAGES:
        rows = df[df["stage"] == stage]
        assert len(rows) >= 1, stage
        if stage == "split":
            assert (rows["flops"] == 0).all()
        else:
            assert (rows["flops"] > 0).all(), stage
    assert total == pytest.approx(df["gpu_hours"].sum())
    assert per["flops"].sum() == pytest.approx(df["flops"].sum())
    assert per["gpu_hours"].sum() == pytest.approx(total)
    assert df["gpu_hours"].to_numpy() == pytest.approx(df["flops"].to_numpy() / 10e12 / 3600)
    assert df["key"].is_unique


@pytest.mark.parametrize("grid", PAPER, ids=[p.name for p in PAPER])
def test_every_paper_grid_estimates(grid, fake_data, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("DIFFMI_DATA", str(fake_data))
    monkeypatch.setenv("DIFFMI_STORAGE", str(tmp_path / "store"))
    df, per, total = cost.estimate_grid(grid)
    assert total > 0 and (df[df["stage"] != "split"]["flops"] > 0).all()
    assert per["gpu_hours"].sum() == pytest.approx(total)


def test_paper_grid_estimates_without_its_data_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMI_DATA", str(tmp_path / "absent"))
    monkeypatch.setenv("DIFFMI_STORAGE", str(tmp_path / "store"))
    df, _, total = cost.estimate_grid(GRIDS / "paper" / "table1.yaml", sustained_tflops=40.0)
    # CelebA from the paper table: 30,027 private images, 90 % train -> 27,024 train images
    sizes = cost.data_sizes({"private": {"dataset": "celeba", "root": "x", "split_file": "private_1000ids.txt"},
                             "public": {"dataset": "celeba", "root": "x", "split_file": "ganset.txt"}})
    assert (sizes.classes, sizes.train, sizes.test, sizes.public) == (1000, 27_024, 3_003, 30_000)
    # the CDM prior: iterations x batch = 50,000 x 300 U-Net training examples
    prior = df[df["label"] == "prior cdm"]
    assert len(prior) == 3 and "15,000,000 x cdm_unet@3x64x64 x3" in prior["detail"].iloc[0]
    assert total > 0


def test_measure_sustained_flops_runs_on_a_tiny_model():
    net = cost.classifier_net({"model": "small_cnn", "model_kwargs": {"width": 4}}, 16, 1, 3)
    m = cost.measure_sustained_flops("cpu", models=[("tiny", net, 2)], steps=1, warmup=1, threads=1)
    info = m["models"]["tiny"]
    assert info["flops_per_step"] == 2 * (1 + cost.BACKWARD_FACTOR) * cost.forward_flops(net)
    assert m["flops_per_s"] > 0 and m["threads"] == 1

"""Diff-MI IIR attack (diffmi_ray.attacks.diff_mi): t schedule, contract, determinism, batch independence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffmi_ray.attacks import AttackInputs, get_attack
from diffmi_ray.attacks.diff_mi import DiffMIAttack, augment, iir_timesteps, iir_timesteps_1000, to_model_time
from diffmi_ray.config.methods import UNetConfig
from diffmi_ray.errors import UserError
from diffmi_ray.training.cdm import build_unet, save_cdm, unet_kwargs

C_IN, SIZE, K = 1, 16, 3


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ t schedule


def _official_base(n, i):
    return ((n - i) / 1.5 + (n - i) / 3 * math.cos(3 / (10 * math.pi) * i)) / n * 800 + 200


def test_schedule_pinned_without_jitter():
    ts = iir_timesteps_1000(30, jitter=0)
    assert len(ts) == 30 and ts[0] == 1000 and ts[-1] == 209
    assert ts == [int(_official_base(30, i)) for i in range(30)]
    assert ts[:4] == [1000, 972, 942, 910] and ts[14:16] == [517, 485]
    t0 = iir_timesteps(30, jitter=0)  # 0-based, T = 1000
    assert t0[0] == 999 and t0[-1] == 208 and t0 == [t - 1 for t in ts]
    assert iir_timesteps(10, jitter=0)[0] == 999 and iir_timesteps(10, jitter=0)[-1] == 269
    assert all(a >= b for a, b in zip(ts, ts[1:]))  # annealed downwards


def test_schedule_jitter_range_and_determinism():
    base = iir_timesteps_1000(30, jitter=0)
    for seed in range(20):
        ts = iir_timesteps_1000(30, jitter=50, generator=torch.Generator().manual_seed(seed))
        assert ts == iir_timesteps_1000(30, jitter=50, generator=torch.Generator().manual_seed(seed))
        assert all(1 <= t <= 1000 for t in ts)
        assert all(-50 <= t - b <= 50 for t, b in zip(ts, base))
    many = [iir_timesteps_1000(30, jitter=50, generator=torch.Generator().manual_seed(s))[5] for s in range(200)]
    assert min(many) - base[5] < -35 and max(many) - base[5] > 35  # the jitter spans its range
    with pytest.raises(ValueError):
        iir_timesteps_1000(5, jitter=50)


def test_schedule_scales_to_other_T():
    assert to_model_time(1000, 1000) == 999 and to_model_time(1, 1000) == 0
    assert to_model_time(1000, 500) == 499 and to_model_time(1, 500) == 0 and to_model_time(200, 500) == 99
    assert iir_timesteps(30, num_timesteps=100, jitter=0)[0] == 99


def test_augment_identity_and_flip():
    v = torch.rand(2, 1, 8, 8)
    none = torch.tensor([[0.9, 0.9, 0.3, 0.9]] * 2)
    assert torch.equal(augment(v, none), v)
    flip = torch.tensor([[0.1, 0.9, 0.3, 0.9]] * 2)
    assert torch.equal(augment(v, flip), v.flip(-1))
    bright = torch.tensor([[0.9, 0.1, 1.0, 0.9]] * 2)  # factor 1.2
    assert torch.allclose(augment(v, bright), v * 1.2)
    blur = augment(v, torch.tensor([[0.9, 0.9, 0.3, 0.1]] * 2))
    assert blur.std() < v.std()


# ------------------------------------------------------------------ the attack on tiny models


class TinyTarget(nn.Module):
    """A small frozen CNN following the classifier contract (logits; features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(C_IN, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU())
        self.fc = nn.Linear(12, K)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffmi")
    cfg = UNetConfig(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8], num_heads=1)
    meta = {"model": "cdm_unet", "kwargs": unet_kwargs(cfg, SIZE, C_IN), "num_classes": K, "image_size": SIZE,
            "channels": C_IN, "diffusion": {"steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}}
    torch.manual_seed(1)
    unet = build_unet(meta)
    nn.init.normal_(unet.out[-1].weight, std=0.05)  # a non-trivial (random) eps model
    save_cdm(root / "cdm", unet, meta)
    (root / "pl").mkdir()
    torch.save({"centroids": torch.rand(K, 12), "num_classes": K}, root / "pl" / "pseudo_labels.pt")
    return root


def _attack(artifacts, **over) -> DiffMIAttack:
    cfg = {"iterations": 3, "k": 1, "aug_copies": 2, "ddim_steps": 2, "batch_size": 8,
           "pgd": {"iterations": 2}}
    cfg.update(over)
    inputs = AttackInputs(target=TinyTarget(), num_classes=K, image_shape=(C_IN, SIZE, SIZE),
                          generator_dir=artifacts / "cdm", generator_config={},
                          pseudo_labels_dir=artifacts / "pl")
    return get_attack("diff_mi")(cfg, inputs)


LABELS = torch.tensor([0, 0, 1, 2, 1])


def test_contract_labels_shapes_range(artifacts):
    atk = _attack(artifacts)
    assert isinstance(atk, DiffMIAttack) and all(not p.requires_grad for p in atk.unet.parameters())
    out = atk.invert(LABELS, seed=0)
    out.validate((C_IN, SIZE, SIZE))
    assert torch.equal(out.labels, LABELS)
    assert out.scores.shape == (5,) and ((out.scores >= 0) & (out.scores <= 1)).all()
    assert len(out.extras["timesteps"]) == 3 and out.extras["final_prior_loss"].shape == (5,)
    assert out.images.std() > 0


def test_deterministic_under_seed(artifacts):
    atk = _attack(artifacts)
    a = atk.invert(LABELS, seed=3).images
    b = atk.invert(LABELS, seed=3).images
    c = atk.invert(LABELS, seed=4).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_independent(artifacts):
    whole = _attack(artifacts, batch_size=8).invert(LABELS, seed=1).images
    split = _attack(artifacts, batch_size=2).invert(LABELS, seed=1).images
    assert torch.allclose(whole, split, atol=1e-4)
    # the j-th image of class c is the same whatever else is attacked with it
    alone = _attack(artifacts).invert(torch.tensor([1, 1]), seed=1).images
    assert torch.allclose(alone, whole[[2, 4]], atol=1e-4)
    # two repeats of one class differ
    assert not torch.allclose(whole[0], whole[1])


def test_loss_variants_and_switches(artifacts):
    for over in ({"loss": "ce"}, {"loss": "max_margin"}, {"alpha": 0.0, "k": 0},
                 {"pgd": {"enabled": False}, "renoise_t": 0}, {"ddim_eta": 0.0}):
        out = _attack(artifacts, **over).invert(LABELS[:2], seed=0)
        out.validate((C_IN, SIZE, SIZE))


def test_pgd_raises_the_target_score(artifacts):
    no = _attack(artifacts, pgd={"enabled": False}).invert(LABELS, seed=2)
    yes = _attack(artifacts, pgd={"iterations": 5, "eps": 2.0, "step_size": 0.5}).invert(LABELS, seed=2)
    assert (yes.scores >= no.scores - 1e-6).all() and yes.scores.mean() > no.scores.mean()


def test_config_errors(artifacts):
    with pytest.raises(UserError, match="k = 3"):
        _attack(artifacts, k=3)
    inputs = AttackInputs(target=TinyTarget(), num_classes=K, image_shape=(3, SIZE, SIZE),
                          generator_dir=artifacts / "cdm", generator_config={})
    with pytest.raises(UserError, match="makes"):
        DiffMIAttack({}, inputs)
    inputs.image_shape = (C_IN, SIZE, SIZE)
    with pytest.raises(UserError, match="centroids"):
        DiffMIAttack({"k": 1}, inputs)

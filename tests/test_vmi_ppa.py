"""VMI and PPA at tiny scale: a random-weight width-8 DCGAN prior (a real ``gan_wgangp`` artifact folder,
loaded through the attacks' own loader) and hand-made targets on 32 px grey images.

Covers: the attack contract (labels honoured, shapes, [0, 1] range, determinism under the seed, the
same result whatever chunks the classes are attacked in); VMI's objective decreases and contains the
KL term; PPA's initial and final selections keep the most confident candidates (pinned on a target
whose confidence is a known function of brightness); both raise T's confidence of the class over
random samples of G.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffmi_ray.attacks import AttackInputs, get_attack
from diffmi_ray.attacks import ppa as ppa_mod
from diffmi_ray.attacks import vmi as vmi_mod
from diffmi_ray.config.methods import GANArchConfig, PPAAttackConfig, VMIAttackConfig
from diffmi_ray.errors import UserError
from diffmi_ray.training import gan_wgangp

SIZE, CH, Z = 32, 1, 16
SHAPE = (CH, SIZE, SIZE)

VMI_TINY = {"flow_steps": 2, "flow_levels": 2, "steps": 10, "batch_size": 8, "lr": 0.01}
PPA_TINY = {"candidates": 40, "keep": 6, "iterations": 8, "lr": 0.05, "final_transforms": 4, "batch_size": 8}


class PooledLinear(nn.Module):
    """A fixed random linear classifier on the 4x4-average-pooled contrast pattern (image minus its mean):
    logits = W pool(x - mean(x)), W ~ N(0, scale^2 / d)."""

    def __init__(self, num_classes: int = 3, scale: float = 8.0):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        d = CH * (SIZE // 4) ** 2
        self.w = nn.Parameter(torch.randn(num_classes, d, generator=g) / d ** 0.5 * scale, requires_grad=False)

    def forward(self, x):
        return nn.functional.avg_pool2d(x - x.mean(dim=(1, 2, 3), keepdim=True), 4).flatten(1) @ self.w.T


class Brightness(nn.Module):
    """logits = (s * m, -s * m, 0) with m the image's mean pixel: class 0 likes bright, class 1 dark images."""

    def __init__(self, s: float = 20.0):
        super().__init__()
        self.s = s

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([self.s * m, -self.s * m, torch.zeros_like(m)], 1)


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    """A gan_wgangp artifact folder holding a random-weight width-8 DCGAN (z_dim 16, 32 px grey)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("prior")
    arch = GANArchConfig(width=8, z_dim=Z)
    torch.manual_seed(0)
    G, D, gkw, dkw = gan_wgangp.build_models(arch, num_classes=0, image_size=SIZE, channels=CH)
    # calibrate BatchNorm on random latents and sharpen the output layer, so samples differ visibly
    for m in G.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        G.train()(torch.randn(256, Z))
        G.l2_5[-2].weight.mul_(3.0)
    G.eval()
    gan_wgangp.write_artifact(SimpleNamespace(is_main=True, out_dir=out), kind=gan_wgangp.KIND, arch=arch, G=G, D=D,
                              gkw=gkw, dkw=dkw, num_classes=0, source="test")
    return out


def make_attack(name: str, prior_dir, cfg: dict, target: nn.Module | None = None):
    target = (target or PooledLinear()).eval()
    inputs = AttackInputs(target=target, num_classes=3, image_shape=SHAPE, generator_dir=prior_dir,
                          generator_config={}, log=lambda s: None)
    return get_attack(name)(cfg, inputs)


CASES = {"vmi": VMI_TINY, "ppa": PPA_TINY}


# ------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", list(CASES))
def test_contract_and_determinism(name, prior_dir):
    atk = make_attack(name, prior_dir, CASES[name])
    labels = torch.tensor([2, 0, 2, 1, 0])
    out = atk.invert(labels, seed=7)
    out.validate(SHAPE)
    assert torch.equal(out.labels, labels)
    assert out.scores.shape == (5,) and ((out.scores >= 0) & (out.scores <= 1)).all()
    again = make_attack(name, prior_dir, CASES[name]).invert(labels, seed=7)
    assert torch.equal(out.images, again.images)
    other = atk.invert(labels, seed=8)
    assert not torch.allclose(out.images, other.images)
    # the two images of one class are different samples
    assert not torch.allclose(out.images[0], out.images[2])


@pytest.mark.parametrize("name", list(CASES))
def test_same_result_in_other_chunks(name, prior_dir):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    whole = make_attack(name, prior_dir, CASES[name]).invert(labels, seed=3)
    atk = make_attack(name, prior_dir, CASES[name])
    parts = [atk.invert(labels[:2], seed=3), atk.invert(labels[2:], seed=3)]
    chunked = torch.cat([p.images for p in parts])
    torch.testing.assert_close(chunked, whole.images, atol=1e-4, rtol=0)
    # request order does not matter either: class 2 first
    perm = torch.tensor([4, 5, 0, 1, 2, 3])
    shuffled = make_attack(name, prior_dir, CASES[name]).invert(labels[perm], seed=3)
    torch.testing.assert_close(shuffled.images, whole.images[perm], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_attack_raises_target_confidence(name, prior_dir):
    cfg = dict(CASES[name])
    cfg.update({"steps": 30, "lr": 0.05} if name == "vmi" else {"iterations": 30})
    target = PooledLinear().eval()
    atk = make_attack(name, prior_dir, cfg, target)
    labels = torch.arange(3).repeat_interleave(4)
    out = atk.invert(labels, seed=0)
    with torch.no_grad():
        z = torch.randn(200, Z, generator=torch.Generator().manual_seed(1))
        probs = target(atk.G.to_unit(atk.G(z))).softmax(-1)  # random samples of the prior
    for c in range(3):  # in log-odds
        gain = torch.logit(out.scores[labels == c]).mean() - torch.logit(probs[:, c]).mean()
        assert gain > 0.3, (c, out.scores, probs.mean(0))


# ----------------------------------------------------------------------------------------------- VMI


def test_vmi_objective_decreases_and_includes_kl(prior_dir):
    atk = make_attack("vmi", prior_dir, VMI_TINY)
    cfg = VMIAttackConfig.model_validate({**VMI_TINY, "steps": 40, "lambda_kl": 0.1})
    fit = vmi_mod.fit_flows(atk.G, atk.inputs.target, [0, 2], seed=0, cfg=cfg)
    assert fit.loss.shape == (40, 2)
    torch.testing.assert_close(fit.loss, fit.ce + 0.1 * fit.kl)
    assert (fit.kl[0].abs() < 1e-4).all()  # a fresh flow is exactly N(0, I): KL = 0
    assert (fit.kl[-5:].mean(0) > 0).all()  # ... and moves away from it
    assert (fit.loss[-5:].mean(0) < fit.loss[:5].mean(0)).all()

    # the KL weight changes the fit and pulls q back towards N(0, I)
    free = vmi_mod.fit_flows(atk.G, atk.inputs.target, [0, 2], seed=0,
                             cfg=cfg.model_copy(update={"lambda_kl": 0.0}))
    tied = vmi_mod.fit_flows(atk.G, atk.inputs.target, [0, 2], seed=0,
                             cfg=cfg.model_copy(update={"lambda_kl": 0.5}))
    assert (tied.kl[-5:].mean(0) < free.kl[-5:].mean(0)).all()
    assert (free.ce[-5:].mean(0) <= tied.ce[-5:].mean(0)).all()


def test_vmi_flows_are_per_class_and_seeded(prior_dir):
    cfg = VMIAttackConfig.model_validate(VMI_TINY)
    a, b = vmi_mod.build_flow(Z, cfg, 0, 1), vmi_mod.build_flow(Z, cfg, 0, 1)
    c = vmi_mod.build_flow(Z, cfg, 0, 2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.K == 2 and a.L == 2


# ----------------------------------------------------------------------------------------------- PPA


def test_ppa_initial_selection_keeps_most_confident(prior_dir):
    atk = make_attack("ppa", prior_dir, PPA_TINY, Brightness())
    cfg = atk.config
    pool, conf = atk.pool(5)
    with torch.no_grad():
        m = atk.G.to_unit(atk.G(pool)).mean(dim=(1, 2, 3))  # flip-invariant brightness
    idx = ppa_mod.initial_selection(conf, [0, 1], cfg.keep)
    assert torch.equal(idx[0], torch.argsort(m, descending=True)[:cfg.keep])  # class 0: brightest
    assert torch.equal(idx[1], torch.argsort(m)[:cfg.keep])                   # class 1: darkest
    # hand-made confidences: ties keep the lower index; keep > candidates is a user error
    hand = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.7, 0.2], [0.2, 0.8]])
    assert ppa_mod.initial_selection(hand, [0, 1], 3).tolist() == [[1, 2, 3], [0, 3, 1]]
    with pytest.raises(UserError):
        ppa_mod.initial_selection(hand, [0], 5)
    # the pool depends on the seed only
    assert torch.equal(ppa_mod.candidate_pool(Z, 40, 5), pool)


def test_ppa_final_selection_keeps_best_transform_scores(prior_dir):
    assert ppa_mod.final_selection(torch.tensor([0.2, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]
    atk = make_attack("ppa", prior_dir, PPA_TINY, Brightness())
    k = PPA_TINY["keep"]
    everything = atk.invert(torch.tensor([0] * k + [1] * k), seed=2)  # every optimised candidate, best first
    for c in (0, 1):
        sc = everything.extras["selection_score"][everything.labels == c]
        assert (sc[:-1] >= sc[1:]).all()
        assert sorted(everything.extras["rank"][everything.labels == c].tolist()) == list(range(k))
    two = atk.invert(torch.tensor([0, 0, 1, 1]), seed=2)
    for c in (0, 1):
        full = everything.extras["selection_score"][everything.labels == c]
        torch.testing.assert_close(two.extras["selection_score"][two.labels == c], full[:2])
        torch.testing.assert_close(two.images[two.labels == c], everything.images[everything.labels == c][:2])
    # brightness target: class 0 images end brighter than class 1 images
    m = two.images.mean(dim=(1, 2, 3))
    assert m[:2].min() > m[2:].max()
    with pytest.raises(UserError):
        atk.invert(torch.tensor([0] * (k + 1)), seed=2)


def test_ppa_random_resized_crop():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(3, 1, 1, 1)
    u = torch.tensor([[1.0 - 1e-9, 0.5, 0.5, 0.5, 0.9],   # full area, ratio 1, no flip: identity
                      [1.0 - 1e-9, 0.5, 0.5, 0.5, 0.1],   # flipped
                      [0.0, 0.5, 0.0, 0.0, 0.9]])         # quarter area at the top-left corner
    y = ppa_mod.random_resized_crop(x, u, scale=(0.25, 1.0), ratio=(1.0, 1.0), flip_p=0.5)
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[1], x[0].flip(-1))
    # only the top-left 2x2 block is visible (bilinear samples at its edge blend with the next pixel)
    assert y[2].max() <= x[0, 0, :3, :3].max() and y[2].mean() < x[0, 0, :3, :3].mean()
    xg = x.clone().requires_grad_(True)
    ppa_mod.random_resized_crop(xg, u, scale=(0.5, 0.9), ratio=(0.8, 1.2)).sum().backward()
    assert xg.grad.abs().sum() > 0

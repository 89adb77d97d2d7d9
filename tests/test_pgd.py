"""Targeted L2 PGD (diffmi_ray.attacks.pgd): score goes up, the eps ball holds, the best iterate is kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffmi_ray.attacks.pgd import pgd_l2


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_classifier(d: int, k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _prob(model, x, y):
    with torch.no_grad():
        return model(x).softmax(-1).gather(1, y.view(-1, 1)).squeeze(1)


def _norms(v):
    return v.flatten(1).norm(dim=1)


def test_pgd_increases_target_score_and_stays_in_ball():
    model = _linear_classifier(1 * 8 * 8, 5)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = pgd_l2(model, x, y, eps=0.5, step_size=0.1, iterations=10, random_start=True,
                 generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape and not out.requires_grad
    assert out.min() >= 0 and out.max() <= 1
    assert (_norms(out - x) <= 0.5 + 1e-5).all()
    assert (_prob(model, out, y) > _prob(model, x, y)).all()


def test_pgd_eps_ball_is_binding_with_large_steps():
    model = _linear_classifier(3 * 4 * 4, 3, seed=3)
    x = torch.full((4, 3, 4, 4), 0.5)
    y = torch.tensor([0, 1, 2, 0])
    out = pgd_l2(model, x, y, eps=0.3, step_size=1.0, iterations=5, random_start=False)
    d = _norms(out - x)
    assert (d <= 0.3 + 1e-5).all() and (d > 0.29).all()  # it walks to the boundary and stays on it


class _Bowl(nn.Module):
    """Class-0 logit = -s * ||x - c||^2, class-1 logit = 0: CE of class 0 is lowest at x = c.

    Records every input it sees (the PGD iterates)."""

    def __init__(self, c: torch.Tensor, s: float = 50.0):
        super().__init__()
        self.c, self.s, self.seen = c, s, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        l0 = -self.s * (x - self.c).flatten(1).pow(2).sum(1)
        return torch.stack([l0, torch.zeros_like(l0)], dim=1)


def test_pgd_keeps_the_best_iterate_not_the_last():
    # start 0.25 from the optimum; steps of 0.3 overshoot and oscillate: 0.25, 0.05, 0.25, 0.05, 0.25
    c = torch.tensor([[[[0.5, 0.5]]]])
    x = torch.tensor([[[[0.75, 0.5]]]])
    model = _Bowl(c)
    y = torch.tensor([0])
    out = pgd_l2(model, x, y, eps=0.5, step_size=0.3, iterations=4, random_start=False)
    iterates = list(model.seen)  # 5 candidates: start + 4 steps
    assert len(iterates) == 5
    losses = torch.stack([F.cross_entropy(model(it), y, reduction="none") for it in iterates])[:, 0]
    best = int(torch.argmin(losses))
    assert best != len(iterates) - 1
    assert torch.allclose(out, iterates[best])
    assert torch.allclose((out - c).abs().sum(), torch.tensor(0.05), atol=1e-5)


def test_pgd_per_sample_generators_make_results_batch_independent():
    model = _linear_classifier(1 * 6 * 6, 4, seed=5)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 2, 1, 0])

    def gens(ids):
        return [torch.Generator().manual_seed(100 + i) for i in ids]

    full = pgd_l2(model, x, y, 0.5, 0.1, 5, True, generator=gens(range(4)))
    part = torch.cat([pgd_l2(model, x[:1], y[:1], 0.5, 0.1, 5, True, generator=gens([0])),
                      pgd_l2(model, x[1:], y[1:], 0.5, 0.1, 5, True, generator=gens([1, 2, 3]))])
    assert torch.allclose(full, part, atol=1e-6)


def test_pgd_zero_eps_returns_input():
    model = _linear_classifier(4, 2)
    x = torch.rand(2, 1, 2, 2)
    assert torch.equal(pgd_l2(model, x, torch.tensor([0, 1]), 0.0, 0.1, 3), x)

"""Losses pinned on hand-made logits."""

import math

import pytest
import torch

from diffmi_ray.attacks.losses import (cross_entropy_loss, l_cls, max_margin_loss, p_reg_loss, poincare_loss,
                                       top_k_loss)

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
Y = torch.tensor([0, 2])


def test_max_margin():
    # row 0: -2 + 1 = -1; row 1: -1 + 3 = 2 -> mean 0.5
    assert max_margin_loss(LOGITS, Y).item() == pytest.approx(0.5)


def test_top_k():
    assert top_k_loss(LOGITS, Y, 0).item() == pytest.approx((-2 - 1) / 2)
    assert top_k_loss(LOGITS, Y, 1).item() == pytest.approx(max_margin_loss(LOGITS, Y).item())
    # k=2: row 0: -2 + (1+0)/2 = -1.5; row 1: -1 + (3+0.5)/2 = 0.75 -> -0.375
    assert top_k_loss(LOGITS, Y, 2).item() == pytest.approx(-0.375)
    # k=3: row 0: -2 + 0 = -2; row 1: -1 + 3.5/3
    assert top_k_loss(LOGITS, Y, 3).item() == pytest.approx((-2 + (-1 + 3.5 / 3)) / 2)
    with pytest.raises(ValueError, match="k < number of classes"):
        top_k_loss(LOGITS, Y, 4)


def test_cross_entropy():
    ref = -(torch.log_softmax(LOGITS, 1)[0, 0] + torch.log_softmax(LOGITS, 1)[1, 2]) / 2
    assert cross_entropy_loss(LOGITS, Y).item() == pytest.approx(ref.item())


def test_p_reg():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([[0.0, 0.0], [9.0, 9.0], [0.0, 1.0]])
    # row 0 vs c0: (1 + 0); row 1 vs c2: (0 + 1) -> sum 2 over 4 entries = 0.5
    assert p_reg_loss(f, c, Y).item() == pytest.approx(0.5)
    total = l_cls(LOGITS, Y, k=2, alpha=2.0, features=f, centroids=c)
    assert total.item() == pytest.approx(-0.375 + 1.0)
    assert l_cls(LOGITS, Y, k=2, alpha=0.0).item() == pytest.approx(-0.375)


def test_poincare():
    logits = torch.tensor([[3.0, 1.0]])
    y = torch.tensor([0])
    u = torch.tensor([0.75, 0.25])
    v = torch.tensor([1 - 1e-5, 0.0])
    d = 2 * ((u - v) ** 2).sum() / ((1 - (u * u).sum()) * (1 - (v * v).sum()))
    assert poincare_loss(logits, y).item() == pytest.approx(math.acosh(1 + d.item()), rel=1e-5)
    # a confident correct prediction has a smaller loss than a wrong one
    assert poincare_loss(torch.tensor([[9.0, 0.1]]), y) < poincare_loss(torch.tensor([[0.1, 9.0]]), y)

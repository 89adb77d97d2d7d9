"""BiDO dependence measures: pinned values, parity with a plain NumPy reference, gradients, optimisation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffmi_ray.defenses import bido
from diffmi_ray.defenses.bido import bido_regulariser, bido_terms, coco, dependence, hsic, nhsic

# --- pinned values on m = 2 samples, derived by hand ---------------------------------------------
# For two samples at squared distance D with Gaussian width s (d = 1 feature): K = [[1, k], [k, 1]],
# k = exp(-D / (2 s^2)); with H = I - 11^T/2 = P (the projector onto (1, -1)/sqrt 2): K H = (1 - k) P
# and H K H = (1 - k) P. Writing a = 1 - k_x, b = 1 - k_y and c = 1e-5 * m:
#   HSIC  = tr(aP bP) / (m-1)^2                   = a b
#   nHSIC = tr(a/(a+c) P  b/(b+c) P)              = a b / ((a + c)(b + c))
#   COCO  = sqrt(||a b P||_F) / m, ||P||_F = 1    = sqrt(a b) / 2
X2 = torch.tensor([[0.0], [1.0]])  # D = 1
Y2 = torch.tensor([[0.0], [2.0]])  # D = 4
A = 1 - math.exp(-0.5)  # sigma = 1
B = 1 - math.exp(-2.0)
C = 1e-5 * 2


def test_pinned_two_sample_values():
    assert hsic(X2, Y2, sigma=1.0).item() == pytest.approx(A * B, rel=1e-6)  # 0.340219...
    assert nhsic(X2, Y2, sigma=1.0).item() == pytest.approx(A * B / ((A + C) * (B + C)), rel=1e-6)
    assert coco(X2, Y2, sigma=1.0).item() == pytest.approx(math.sqrt(A * B) / 2, rel=1e-6)  # 0.291641...
    assert hsic(X2, Y2, sigma=1.0).item() == pytest.approx(0.3402190557, rel=1e-6)


def test_pinned_linear_kernel_on_one_hot_labels():
    # two samples of different classes: L = I, so H L H = P (b = 1); Gaussian on X with sigma = 1
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert hsic(X2, y, sigma=1.0, kernel_y="linear").item() == pytest.approx(A, rel=1e-6)
    assert nhsic(X2, y, sigma=1.0, kernel_y="linear").item() == pytest.approx(A / ((A + C) * (1 + C)), rel=1e-6)
    # sigma scales per dimension: d = 2 features with sigma s equals d = 1 with sigma s * sqrt(2)
    x2d = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert hsic(x2d, y, sigma=1.0, kernel_y="linear").item() == pytest.approx(1 - math.exp(-0.25), rel=1e-6)


def _np_reference(x, y, sigma, measure):
    """Direct float64 NumPy transcription of the formulas (loops, explicit inverse)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    m = len(x)

    def gram(a):
        g = np.empty((m, m))
        for i in range(m):
            for j in range(m):
                g[i, j] = np.exp(-np.sum((a[i] - a[j]) ** 2) / (2 * sigma**2 * a.shape[1]))
        return g

    k, l = gram(x), gram(y)
    h = np.eye(m) - np.ones((m, m)) / m
    if measure == "hsic":
        return np.trace(k @ h @ l @ h) / (m - 1) ** 2
    if measure == "nhsic":
        rx = (k @ h) @ np.linalg.inv(k @ h + 1e-5 * m * np.eye(m))
        ry = (l @ h) @ np.linalg.inv(l @ h + 1e-5 * m * np.eye(m))
        return np.trace(rx @ ry)
    return np.sqrt(np.linalg.norm((h @ k @ h) @ (h @ l @ h), "fro")) / m


@pytest.mark.parametrize("measure,fn", [("hsic", hsic), ("nhsic", nhsic), ("coco", coco)])
def test_parity_with_numpy_reference(measure, fn):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 2, 2, 2, generator=g)
    y = torch.randn(6, 3, generator=g)
    ref = _np_reference(x.numpy(), y.numpy(), 0.7, measure)
    assert fn(x, y, sigma=0.7).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("measure", ["hsic", "nhsic", "coco"])
def test_dependent_scores_higher_than_independent(measure):
    fn = {"hsic": hsic, "nhsic": nhsic, "coco": coco}[measure]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g)
    indep = torch.randn(64, 1, generator=g)
    dep_val, indep_val = fn(x, x**2, sigma=1.0).item(), fn(x, indep, sigma=1.0).item()
    # COCO is a square root of a covariance norm, so its ratios are compressed
    assert dep_val > (1.3 if measure == "coco" else 3.0) * indep_val > 0
    # symmetric in its arguments
    assert fn(x**2, x, sigma=1.0).item() == pytest.approx(dep_val, rel=1e-4)


def test_nhsic_range():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g)
    v = nhsic(x, x, sigma=0.5).item()
    assert 0.0 <= v <= 15.0 + 1e-4
    assert v > 14.0  # a full-rank kernel against itself is close to the maximum m - 1


def _mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 4, 4, generator=g)
    y = F.one_hot(torch.randint(0, 4, (32,), generator=g), 4).float()
    return x, y


@pytest.mark.parametrize("measure", ["hsic", "coco"])
def test_gradient_flows_to_parameters(measure):
    torch.manual_seed(0)
    net = _mlp()
    x, y = _batch()
    h1 = net[2](net[1](net[0](x)))
    z = net[3](h1)
    loss = bido_regulariser(x, [h1, z], y, 0.1, 1.0, measure=measure)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_regulariser_is_the_weighted_sum_of_terms():
    torch.manual_seed(0)
    x, y = _batch()
    zs = [torch.randn(32, 5), torch.randn(32, 2, 3)]
    terms = bido_terms(x, zs, y, kernel_y="linear")
    want = sum(0.3 * a - 2.0 * b for a, b in terms)
    got = bido_regulariser(x, zs, y, 0.3, 2.0, kernel_y="linear")
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert terms[0][0].item() == pytest.approx(dependence(zs[0], x).item(), rel=1e-6)


@pytest.mark.parametrize("measure", ["hsic", "coco"])
def test_optimising_the_regulariser_lowers_dep_x_z(measure):
    torch.manual_seed(0)
    net = _mlp()
    x, y = _batch()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = dependence(net(x), x, measure=measure).item()
    for _ in range(25):
        loss = bido_regulariser(x, [net(x)], y, lambda_x=1.0, lambda_y=0.0, measure=measure)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dependence(net(x), x, measure=measure).item()
    assert after < 0.5 * before


def test_constant_batch_keeps_gradients_finite():
    z = torch.zeros(4, 3, requires_grad=True)
    x = torch.rand(4, 3)
    (coco(z, x) + nhsic(z, x)).backward()
    assert torch.isfinite(z.grad).all()


def test_input_errors():
    x, y = _batch()
    with pytest.raises(ValueError, match="one_hot"):
        bido_regulariser(x, [x], y.argmax(1), 1.0, 1.0)
    with pytest.raises(ValueError, match="measure"):
        bido_regulariser(x, [x], y, 1.0, 1.0, measure="mi")
    with pytest.raises(ValueError, match="same samples"):
        nhsic(x, x[:3])
    with pytest.raises(ValueError, match="at least one"):
        bido_regulariser(x, [], y, 1.0, 1.0)
    with pytest.raises(ValueError, match="kernel"):
        bido.kernel_matrix(x, "poly")

"""VMI latent flows: invertibility, exact densities, reproducible reparameterised sampling, KL helper."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffmi_ray.models.flows import (COUPLINGS, PERMUTATIONS, ClassConditionalFlows, GlowVectorFlow,
                                     kl_to_standard_normal, standard_normal_log_prob)

COMBOS = list(itertools.product(COUPLINGS, PERMUTATIONS))


def _perturbed(flow: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its (identity) init so the tests exercise a non-trivial bijection."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


@pytest.mark.parametrize("coupling,permutation", COMBOS)
def test_invertible(coupling, permutation):
    f = _perturbed(GlowVectorFlow(10, K=2, L=3, hidden=8, coupling=coupling, permutation=permutation), scale=0.1)
    z = torch.randn(6, 10)
    with torch.no_grad():
        eps, ld = f.encode(z)
        z2, ld2 = f.decode(eps)
    assert (z - z2).abs().max() < 1e-5  # float32: z -> eps -> z
    assert (ld + ld2).abs().max() < 1e-4  # inverse maps have opposite log-determinants
    f = f.double()
    z = z.double()
    with torch.no_grad():
        assert (f.decode(f.encode(z)[0])[0] - z).abs().max() < 1e-10
        assert (f.encode(f.decode(z)[0])[0] - z).abs().max() < 1e-10  # eps -> z -> eps


@pytest.mark.parametrize("coupling,permutation", COMBOS)
def test_log_prob_matches_bruteforce_jacobian(coupling, permutation):
    f = _perturbed(GlowVectorFlow(4, K=2, L=2, hidden=6, coupling=coupling, permutation=permutation).double())
    z = torch.randn(3, 4, dtype=torch.float64)
    lp = f.log_prob(z)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: f.encode(v[None])[0][0], z[i])  # (4, 4) d eps / d z
        eps = f.encode(z[i:i + 1])[0][0]
        ref = standard_normal_log_prob(eps) + torch.linalg.slogdet(jac)[1]
        assert torch.allclose(lp[i], ref, atol=1e-8)
    # the density returned by reparameterised sampling is the same function
    zs, lq = f.sample(5, torch.Generator().manual_seed(3))
    assert torch.allclose(lq, f.log_prob(zs), atol=1e-8)


def test_fresh_flow_is_standard_normal():
    f = GlowVectorFlow(6, K=3, L=2, hidden=8, coupling="affine", permutation="invconv")
    z = torch.randn(5, 6)
    ref = torch.distributions.MultivariateNormal(torch.zeros(6), torch.eye(6)).log_prob(z)
    assert torch.allclose(f.log_prob(z), ref, atol=1e-4)
    zs, lq = f.sample(8, torch.Generator().manual_seed(0))
    assert abs(kl_to_standard_normal(zs, lq).item()) < 1e-4


def test_actnorm_only_flow_equals_diagonal_gaussian():
    # K=1, L=1, additive coupling with its zero output layer: q(z) is the actnorm's Gaussian,
    # y = (z + loc) * exp(s) ~ N(0, I)  <=>  z ~ N(-loc, exp(-s)^2) (the permutation preserves N(0, I)).
    f = GlowVectorFlow(4, K=1, L=1, hidden=5).double()
    an = f.levels[0][0].layers[0]
    with torch.no_grad():
        an.loc.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        an.log_scale.copy_(torch.tensor([0.3, -0.2, 0.0, 1.0]))
    q = torch.distributions.Normal(-an.loc.detach(), torch.exp(-an.log_scale.detach()))
    z = torch.randn(7, 4, dtype=torch.float64)
    assert torch.allclose(f.log_prob(z), q.log_prob(z).sum(-1), atol=1e-10)
    # Monte-Carlo KL against the closed form KL(N(m, s^2) || N(0, 1)) = sum(-log s + (s^2 + m^2 - 1) / 2)
    zs, lq = f.sample(20000, torch.Generator().manual_seed(0))
    m, s = q.mean, q.stddev
    exact = (-torch.log(s) + (s ** 2 + m ** 2 - 1) / 2).sum()
    assert abs(kl_to_standard_normal(zs, lq).item() - exact.item()) < 0.05 * exact.item()


def test_sampling_reproducible_and_reparameterised():
    f = _perturbed(GlowVectorFlow(8, K=2, L=2, hidden=8, coupling="affine"))
    z1, l1 = f.sample(4, torch.Generator().manual_seed(7))
    z2, l2 = f.sample(4, torch.Generator().manual_seed(7))
    z3, _ = f.sample(4, torch.Generator().manual_seed(8))
    assert torch.equal(z1, z2) and torch.equal(l1, l2)
    assert not torch.allclose(z1, z3)
    eps = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(f.sample(4, eps=eps)[0], z1)
    f.zero_grad()
    (z1.pow(2).sum() + kl_to_standard_normal(z1, l1)).backward()
    last = f.levels[0][0].layers[-1].net[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_construction_deterministic_under_seed():
    torch.manual_seed(123)
    a = GlowVectorFlow(8, K=2, L=2, hidden=8, permutation="invconv", seed=5)
    torch.manual_seed(456)
    b = GlowVectorFlow(8, K=2, L=2, hidden=8, permutation="invconv", seed=5)
    c = GlowVectorFlow(8, K=2, L=2, hidden=8, permutation="invconv", seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_bad_arguments():
    with pytest.raises(ValueError):
        GlowVectorFlow(4, K=1, L=3)  # 4 -> 2 -> 1 numbers
    with pytest.raises(ValueError):
        GlowVectorFlow(8, coupling="spline")
    with pytest.raises(ValueError):
        GlowVectorFlow(8, permutation="random")


def test_paper_size_flow():
    f = GlowVectorFlow(100)  # VMI over the DCGAN latent: K=10, L=3, hidden 100
    assert f.dims == [100, 50, 25]
    z, lq = f.sample(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 100) and lq.shape == (3,)
    assert torch.allclose(lq, standard_normal_log_prob(z), atol=1e-3)  # fresh flow = N(0, I)


def test_class_conditional_flows_route_by_label():
    cf = ClassConditionalFlows(3, 6, K=2, L=2, hidden=8, coupling="affine")
    for i, fl in enumerate(cf.flows):
        _perturbed(fl, seed=i)
    y = torch.tensor([2, 0, 2, 1, 0])
    z, lq = cf.sample(y, torch.Generator().manual_seed(0))
    eps = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    for i, c in enumerate(y.tolist()):
        zi, li = cf[c](eps[i:i + 1])
        assert torch.allclose(z[i], zi[0], atol=1e-6) and torch.allclose(lq[i], li[0], atol=1e-5)
    assert torch.allclose(cf.log_prob(z, y), lq, atol=1e-4)
    assert not torch.allclose(cf[0](eps)[0], cf[1](eps)[0])
    lq.sum().backward()
    for fl in cf.flows:  # every class's flow gets gradients from its own rows
        assert fl.levels[0][0].layers[-1].net[-1].weight.grad.abs().sum() > 0
    assert math.isfinite(kl_to_standard_normal(z, lq).item())

"""Diffusion math: pinned schedule numbers, CFG formula, DDIM and DPM-Solver++ parity with diffusers,
differentiability and checkpointed backprop through the DPM-Solver chain."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffmi_ray.diffusion import (
    CFGModel, ddim_denoise, ddim_sample, ddim_timesteps, dpm_solver_pp_2m, dpm_solver_timesteps, eps_loss,
    linear_schedule, predict_eps, predict_x0, q_sample,
)

SCHED = linear_schedule()


class ToyEps(nn.Module):
    """Deterministic eps model: the exact denoiser of Gaussian data x0 ~ N(mu_y, 0.5^2 I) plus a small
    nonlinear term in x and t, so the sampled x0 stay O(1) and parity tolerances can be tight."""

    def __init__(self, channels: int = 3, num_classes: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.3 * torch.randn(channels, channels, generator=g))
        self.label = nn.Parameter(0.5 * torch.randn(num_classes + 1, channels, generator=g))

    def forward(self, x, t, y=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        a, s = (v.to(x.dtype).reshape(-1, 1, 1, 1) for v in SCHED.alpha_sigma(t))
        mu = 0.0 if y is None else self.label[y].to(x.dtype)[:, :, None, None]
        exact = s * (x - a * mu) / (a ** 2 * 0.25 + s ** 2)
        mix = torch.einsum("ij,bjhw->bihw", self.weight.to(x.dtype), x)
        return exact + 0.05 * torch.tanh(mix) * torch.cos(t.to(x.dtype).reshape(-1, 1, 1, 1) / 400.0)


def _x(seed=1, shape=(2, 3, 5, 5), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------- schedule

def test_linear_schedule_pinned_numbers():
    ac = SCHED.alphas_cumprod
    assert SCHED.num_timesteps == 1000 and ac.dtype == torch.float64
    assert SCHED.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert SCHED.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert ac[0].item() == pytest.approx(0.9999, abs=1e-12)
    assert ac[499].item() == pytest.approx(0.0785872, abs=5e-7)
    assert ac[999].item() == pytest.approx(4.03583e-05, rel=1e-5)
    # other T: endpoints scaled by 1000 / T (guided-diffusion)
    s100 = linear_schedule(100)
    assert s100.betas[0].item() == pytest.approx(1e-3) and s100.betas[-1].item() == pytest.approx(0.2)
    assert s100.alphas_cumprod[-1].item() == pytest.approx(2.03901e-05, rel=1e-4)


def test_schedule_interpolation_and_clean_end():
    assert SCHED.alpha_bar(-1).item() == 1.0
    a, s = SCHED.alpha_sigma(torch.tensor([-1.0, 0.0, 999.0]))
    assert s[0].item() == 0.0 and a[0].item() == 1.0
    assert a[1].item() ** 2 == pytest.approx(0.9999, abs=1e-12)
    assert math.isinf(SCHED.lambda_(-1).item())
    # exact at integers, log alpha linear in between
    ints = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(SCHED.alpha_bar(ints), SCHED.alphas_cumprod, rtol=1e-12, atol=0)
    la = SCHED.log_alpha(torch.tensor([10.0, 10.25, 11.0]))
    assert la[1].item() == pytest.approx(0.75 * la[0].item() + 0.25 * la[2].item(), rel=1e-12)
    lam = SCHED.lambda_(torch.linspace(0, 999, 50, dtype=torch.float64))
    assert torch.all(lam[1:] < lam[:-1])
    with pytest.raises(ValueError):
        SCHED.log_alpha(1000)


def test_q_sample_pinned_and_inverses():
    x0 = torch.linspace(-1, 1, 6).reshape(1, 1, 2, 3)
    noise = torch.linspace(1, -0.5, 6).reshape(1, 1, 2, 3)
    xt = q_sample(SCHED, x0, 499, noise)
    expected = [0.6795683, 0.5037313, 0.3278941, 0.1520571, -0.0237800, -0.1996171]
    assert torch.allclose(xt.flatten(), torch.tensor(expected), atol=1e-6)
    # per-sample t, and the x0/eps inversions
    x0b, nb = _x(2), _x(3)
    t = torch.tensor([0, 999])
    xtb = q_sample(SCHED, x0b, t, nb)
    assert torch.allclose(predict_x0(SCHED, xtb, t, nb), x0b, atol=1e-3)
    assert torch.allclose(predict_eps(SCHED, xtb, t, x0b), nb, atol=1e-3)


def test_eps_loss():
    model = ToyEps()
    x0, noise, y, t = _x(4), _x(5), torch.tensor([0, 4]), torch.tensor([10, 700])
    loss = eps_loss(model, SCHED, x0, y, t, noise)
    manual = ((model(q_sample(SCHED, x0, t, noise), t, y) - noise) ** 2).mean()
    assert loss.shape == () and torch.allclose(loss, manual)
    assert eps_loss(model, SCHED, x0, y, t, noise, reduction="none").shape == (2,)
    loss.backward()
    assert model.weight.grad is not None


# ----------------------------------------------------------------------------------------- guidance

class CountingToy(ToyEps):
    calls = 0

    def forward(self, x, t, y=None):
        CountingToy.calls += 1
        return super().forward(x, t, y)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.5])
def test_cfg_formula_one_batched_call(w):
    model, null = CountingToy(), 4
    x, y, t = _x(6), torch.tensor([1, 2]), torch.tensor([50.0, 900.0])
    CountingToy.calls = 0
    out = CFGModel(model, w, null)(x, t, y)
    assert CountingToy.calls == 1
    cond, unc = model(x, t, y), model(x, t, torch.full_like(y, null))
    assert torch.allclose(out, w * cond - (w - 1) * unc, atol=1e-6)
    # scalar t broadcasts
    assert torch.allclose(CFGModel(model, w, null)(x, 50.0, y)[0], out[0], atol=1e-6)


# ----------------------------------------------------------------------------------------- DDIM

def _diffusers_ddim_chain(model, x, y, eta, noises, spacing, alpha_to_one):
    DDIMScheduler = pytest.importorskip("diffusers").DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      clip_sample=False, set_alpha_to_one=alpha_to_one, steps_offset=0, timestep_spacing=spacing)
    s.set_timesteps(10)
    for i, t in enumerate(s.timesteps):
        eps = model(x, torch.full((x.shape[0],), float(t)), y)
        x = s.step(eps, t, x, eta=eta, variance_noise=noises[i]).prev_sample
    return x, [int(t) for t in s.timesteps]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_trailing(eta):
    """set_alpha_to_one=True, 'trailing' spacing == our [999, 899, ..., 99, -1] (ends at clean data)."""
    model, x, y = ToyEps(), _x(7), torch.tensor([0, 3])
    noises = [_x(100 + i) for i in range(10)]
    ref, ts = _diffusers_ddim_chain(model, x, y, eta, noises, "trailing", True)
    assert ts + [-1] == ddim_timesteps(999, 10)
    with torch.no_grad():
        ours = ddim_sample(model, SCHED, x, ddim_timesteps(999, 10), y, eta=eta, noise=noises)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers_leading_alpha_not_one(eta):
    """set_alpha_to_one=False, 'leading', steps_offset=0: diffusers' last step goes from t=0 to
    abar_0 again, i.e. our points [900, ..., 0] + [0]."""
    model, x, y = ToyEps(), _x(8), torch.tensor([2, 4])
    noises = [_x(200 + i) for i in range(10)]
    ref, ts = _diffusers_ddim_chain(model, x, y, eta, noises, "leading", False)
    assert ts == list(range(900, -1, -100))
    with torch.no_grad():
        ours = ddim_sample(model, SCHED, x, ts + [0], y, eta=eta, noise=noises)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_ddim_denoise_from_t100_generator_reproducible():
    model, y = ToyEps(), torch.tensor([1, 1])
    x0 = _x(9).clamp(-1, 1)
    xt = q_sample(SCHED, x0, 99, _x(10))
    assert ddim_timesteps(99, 10) == list(range(99, -2, -10))
    a = ddim_denoise(model, SCHED, xt, 99, 10, y, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = ddim_denoise(model, SCHED, xt, 99, 10, y, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x0.shape
    with pytest.raises(ValueError):
        ddim_denoise(model, SCHED, xt, 99, 10, y, eta=1.0)  # eta > 0 without injected noise


# ----------------------------------------------------------------------------------------- DPM-Solver++

def _diffusers_dpm_chain(model, x, y, final_sigmas_type, lower_order_final, timesteps=None):
    DPMSolverMultistepScheduler = pytest.importorskip("diffusers").DPMSolverMultistepScheduler
    s = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                    algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                    lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type,
                                    timestep_spacing="linspace")
    if timesteps is None:
        s.set_timesteps(10)
    else:
        s.set_timesteps(timesteps=timesteps)
    for t in s.timesteps:
        eps = model(x, torch.full((x.shape[0],), float(t)), y)
        x = s.step(eps, t, x).prev_sample
    return x, [int(t) for t in s.timesteps]


@pytest.mark.parametrize("final,lower_order_final", [("zero", True), ("sigma_min", True), ("sigma_min", False)])
def test_dpm_solver_matches_diffusers(final, lower_order_final):
    model, x, y = ToyEps(), _x(11), torch.tensor([0, 2])
    ref, ts = _diffusers_dpm_chain(model, x, y, final, lower_order_final)
    end = -1 if final == "zero" else 0
    with torch.no_grad():
        ours = dpm_solver_pp_2m(model, SCHED, x, ts + [end], y, lower_order_final=lower_order_final)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_dpm_solver_matches_diffusers_official_grid_rounded():
    """The official time-uniform grid 999 -> 0 (rounded to integers, as diffusers needs), second order
    to the end like the official 10-step sampler."""
    model, x, y = ToyEps(), _x(12), torch.tensor([1, 3])
    grid = dpm_solver_timesteps(10, integer=True)
    ref, ts = _diffusers_dpm_chain(model, x, y, "sigma_min", False, timesteps=grid[:-1])
    assert ts == grid[:-1] and grid[-1] == 0
    with torch.no_grad():
        ours = dpm_solver_pp_2m(model, SCHED, x, grid, y)  # lower_order_final=None -> False at n=10
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_dpm_solver_intermediates_and_official_targets():
    model, x, y = ToyEps(), _x(13), torch.tensor([0, 1])
    with torch.no_grad():
        out = dpm_solver_pp_2m(CFGModel(model, 3.0, 4), SCHED, x, y=y, return_intermediates=True)
        plain = dpm_solver_pp_2m(CFGModel(model, 3.0, 4), SCHED, x, y=y)
    assert len(out.pred_x0s) == 10 and torch.equal(out.sample, plain)
    targets = out.official_finetune_targets()
    assert len(targets) == 8 and targets[0] is out.pred_x0s[3] and targets[-1] is out.sample
    # ending at clean data: the last output is the last x0 prediction
    with torch.no_grad():
        clean = dpm_solver_pp_2m(model, SCHED, x, dpm_solver_timesteps(5, t_end=-1), y, return_intermediates=True)
    assert torch.equal(clean.sample, clean.pred_x0s[-1])


def _dpm_grads(checkpoint_steps: bool):
    model = ToyEps(seed=3)
    x = _x(14, dtype=torch.float64)
    model.double()
    out = dpm_solver_pp_2m(CFGModel(model, 3.0, 4), SCHED, x, y=torch.tensor([0, 3]), n=6,
                           return_intermediates=True, checkpoint_steps=checkpoint_steps)
    loss = sum((o ** 2).mean() for o in out.official_finetune_targets())
    loss.backward()
    return loss.detach(), model.weight.grad.clone(), model.label.grad.clone()


def test_dpm_solver_differentiable_and_checkpoint_equal_grads():
    l0, gw0, gl0 = _dpm_grads(False)
    l1, gw1, gl1 = _dpm_grads(True)
    assert gw0.abs().sum() > 0 and gl0.abs().sum() > 0
    assert torch.allclose(l0, l1) and torch.allclose(gw0, gw1, atol=1e-12) and torch.allclose(gl0, gl1, atol=1e-12)


def test_dpm_solver_gradient_reaches_first_step():
    """The gradient of the final sample w.r.t. x_T flows through every step."""
    model = ToyEps()
    x = _x(15).requires_grad_(True)
    dpm_solver_pp_2m(model, SCHED, x, y=torch.tensor([0, 1])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dpm_solver_rejects_bad_timesteps():
    model, x = ToyEps(), _x(16)
    with pytest.raises(ValueError):
        dpm_solver_pp_2m(model, SCHED, x, [500, 600, 0])
    with pytest.raises(ValueError):
        dpm_solver_pp_2m(model, SCHED, x, [1000, 0])

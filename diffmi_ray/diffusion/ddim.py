"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

Notation map (code -> paper, eq. 12 of the DDIM paper, 0-based t, abar = alphas_cumprod):

    a_t, a_prev      alpha_t, alpha_{t-1}      (the paper's alpha is our abar)
    eps              eps_theta^{(t)}(x_t)
    x0               f_theta^{(t)}(x_t) = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    std              sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    x_prev           sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std * z,   z ~ N(0, I)

eta = 0 is the deterministic DDIM sampler, eta = 1 the DDPM-like ancestral one. A step to
t_prev = -1 (clean data, a_prev = 1) returns x0 and adds no noise. Randomness is injected:
pass ``noise`` (one standard-normal tensor per step) or a ``generator``.

No torch.no_grad here: chains are differentiable; wrap calls in no_grad when sampling only.
The model is any callable ``(x, t, y) -> eps`` (a U-Net or a CFGModel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from diffmi_ray.diffusion.schedule import Schedule
from diffmi_ray.diffusion.timesteps import ddim_timesteps

__all__ = ["DDIMStep", "DDIMOutput", "ddim_update", "ddim_step", "ddim_sample", "ddim_denoise"]


@dataclass
class DDIMStep:
    prev_sample: torch.Tensor  # x_{t_prev}, shape of x
    pred_x0: torch.Tensor      # f_theta(x_t), shape of x


@dataclass
class DDIMOutput:
    sample: torch.Tensor                                      # x at the last time point
    pred_x0s: list[torch.Tensor] | None = None               # x0 estimate of each step (n)
    samples: list[torch.Tensor] | None = None                # x after each step (n)


def _call(model, x: torch.Tensor, t: float, y):
    t_vec = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    return model(x, t_vec, y)


def ddim_update(sched: Schedule, x: torch.Tensor, eps: torch.Tensor, t: float, t_prev: float,
                eta: float = 0.0, noise: torch.Tensor | None = None, clip_x0: bool = False) -> DDIMStep:
    """One DDIM update from a given eps prediction (no model call).

    x, eps, noise: (B, C, H, W); t > t_prev >= -1 (or t_prev == t, an identity step) are scalar
    0-based times (fractional allowed, see schedule.py). ``noise`` is needed only when eta > 0 and
    the step has nonzero std. clip_x0 clamps x0 to [-1, 1] and re-derives eps from it
    (guided-diffusion's clip_denoised).
    """
    if t_prev > t or t <= -1:
        raise ValueError(f"DDIM steps go from t > -1 back to t_prev <= t, got t {t}, t_prev {t_prev}")
    a_t = float(sched.alpha_bar(t))
    a_prev = float(sched.alpha_bar(t_prev))
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - a_t ** 0.5 * x0) / (1.0 - a_t) ** 0.5
    var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev) if a_prev < 1.0 else 0.0
    std = eta * max(var, 0.0) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + max(1.0 - a_prev - std ** 2, 0.0) ** 0.5 * eps
    if std > 0.0:
        if noise is None:
            raise ValueError("eta > 0 needs noise (or a generator in ddim_sample)")
        x_prev = x_prev + std * noise
    return DDIMStep(prev_sample=x_prev, pred_x0=x0)


def ddim_step(model, sched: Schedule, x: torch.Tensor, t: float, t_prev: float, y: torch.Tensor | None = None,
              eta: float = 0.0, noise: torch.Tensor | None = None, clip_x0: bool = False) -> DDIMStep:
    """Evaluate ``model(x, t, y)`` and take one DDIM step t -> t_prev (see :func:`ddim_update`)."""
    return ddim_update(sched, x, _call(model, x, t, y), t, t_prev, eta, noise, clip_x0)


def _step_noise(noise, generator, i: int, x: torch.Tensor) -> torch.Tensor | None:
    if noise is not None:
        return noise[i].to(device=x.device, dtype=x.dtype)
    if generator is not None:
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return None


def ddim_sample(model, sched: Schedule, x: torch.Tensor, timesteps: Sequence[float], y: torch.Tensor | None = None,
                eta: float = 0.0, noise: Sequence[torch.Tensor] | torch.Tensor | None = None,
                generator: torch.Generator | None = None, clip_x0: bool = False,
                return_intermediates: bool = False) -> torch.Tensor | DDIMOutput:
    """Run DDIM over ``timesteps`` = [t_0, ..., t_n] (descending, n steps; see timesteps.py).

    x: (B, C, H, W), the state at t_0 (pure noise for t_0 = T-1, or ``q_sample`` of an image to
    re-noise it). y: (B,) labels passed to the model. eta > 0 draws per-step noise from ``noise``
    (n tensors shaped like x, or one (n, B, C, H, W) tensor; entry i is used by step i) or else
    from ``generator``. Returns x at t_n ((B, C, H, W); an x0 estimate if t_n = -1), or a
    DDIMOutput with the per-step x0 predictions and states when ``return_intermediates``.
    """
    ts = [float(t) for t in timesteps]
    n = len(ts) - 1
    if n < 1:
        raise ValueError("timesteps needs at least 2 points (1 step)")
    if noise is not None and len(noise) < n:
        raise ValueError(f"noise has {len(noise)} entries for {n} steps")
    pred_x0s, samples = [], []
    for i in range(n):
        out = ddim_step(model, sched, x, ts[i], ts[i + 1], y, eta, _step_noise(noise, generator, i, x)
                        if eta > 0 else None, clip_x0)
        x = out.prev_sample
        if return_intermediates:
            pred_x0s.append(out.pred_x0)
            samples.append(x)
    return DDIMOutput(x, pred_x0s, samples) if return_intermediates else x


def ddim_denoise(model, sched: Schedule, x_t: torch.Tensor, t_start: int, n: int, y: torch.Tensor | None = None,
                 eta: float = 0.0, noise=None, generator: torch.Generator | None = None,
                 clip_x0: bool = False) -> torch.Tensor:
    """Denoise x_t (at integer time t_start) to clean data in n uniform DDIM steps.

    Diff-MI's final refinement in 0-based time: ``x_t = q_sample(sched, x0, 99, z)`` then
    ``ddim_denoise(CFGModel(unet, 3, C), sched, x_t, 99, 10, y, eta=1.0, generator=g)``, which
    visits t = 99, 89, ..., 9 and ends at clean data (-1). Returns (B, C, H, W) in [-1, 1] space.
    """
    return ddim_sample(model, sched, x_t, ddim_timesteps(t_start, n), y, eta, noise, generator, clip_x0)

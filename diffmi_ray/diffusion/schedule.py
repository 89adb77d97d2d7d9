"""Variance-preserving noise schedule, forward noising and the eps-prediction loss.

Notation (DDPM, Ho et al. 2020; code name -> paper symbol):

    betas[t]                 beta_t
    alphas_cumprod[t]        abar_t = prod_{s<=t} (1 - beta_s)
    alpha(t)                 sqrt(abar_t)          ("alpha_t" in DPM-Solver)
    sigma(t)                 sqrt(1 - abar_t)      ("sigma_t" in DPM-Solver)
    lambda(t)                log alpha_t - log sigma_t  (half log-SNR)

Timesteps are 0-based: t = 0 is the least noisy step, t = T-1 the noisiest (conventions.py).
Two extensions are used by the samplers:

- fractional t in [0, T-1]: log alpha is interpolated linearly between integer steps (exact at
  integers). This is DPM-Solver's "discrete" schedule; its continuous time s in [1/T, 1] is
  t = s*T - 1, and the official Diff-MI code feeds the U-Net exactly that t.
- t = -1 denotes clean data: abar = 1, sigma = 0 (DDIM's ``set_alpha_to_one``; a sampler step to
  t = -1 returns the model's x0 prediction). Values in (-1, 0) interpolate towards it.

All schedule arrays are float64 on the CPU; functions gather coefficients and cast them to the
dtype/device of the tensor they scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Schedule", "linear_schedule", "q_sample", "predict_x0", "predict_eps", "eps_loss"]


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete VP schedule of T steps (arrays of shape (T,), float64, CPU)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    # (T+1,) float64: 0.5 * log abar at t = -1, 0, ..., T-1 (the first entry is 0: clean data)
    log_alpha_table: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        table = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(self.alphas_cumprod.double())])
        object.__setattr__(self, "log_alpha_table", table)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def log_alpha(self, t) -> torch.Tensor:
        """log sqrt(abar_t) for (possibly fractional) t in [-1, T-1]; float64 CPU tensor of t's shape."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        T = self.num_timesteps
        if torch.any(t < -1) or torch.any(t > T - 1):
            raise ValueError(f"timesteps must lie in [-1, {T - 1}], got min {t.min().item()}, max {t.max().item()}")
        table = self.log_alpha_table
        pos = t + 1.0  # index into the table
        lo = pos.floor().clamp(max=T - 1).long()
        frac = pos - lo
        return table[lo] * (1 - frac) + table[(lo + 1).clamp(max=T)] * frac

    def alpha_bar(self, t) -> torch.Tensor:
        """abar_t (float64); exact table values at integer t, 1.0 at t = -1."""
        return torch.exp(2.0 * self.log_alpha(t))

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)), float64."""
        la = self.log_alpha(t)
        # sigma = sqrt(1 - exp(2 la)) computed as sqrt(-expm1(2 la)) to keep precision near t = 0.
        return torch.exp(la), torch.sqrt(-torch.expm1(2.0 * la))

    def lambda_(self, t) -> torch.Tensor:
        """Half log-SNR lambda_t = log alpha_t - log sigma_t (float64; +inf at t = -1)."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Linear betas (DDPM; Diff-MI: T = 1000, 1e-4 .. 0.02).

    For T != 1000 the endpoints are scaled by 1000 / T (guided-diffusion's rule), so that the total
    amount of noise stays comparable; T = 1000 gives exactly beta_start .. beta_end.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
    if torch.any(betas >= 1):
        raise ValueError(f"T = {num_timesteps} too small: scaled beta_end {scale * beta_end} >= 1")
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


def _coef(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients (B,) or scalar -> broadcastable (B, 1, ..., 1) in like's dtype/device."""
    v = values.to(device=like.device, dtype=like.dtype)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def _as_t(t, batch: int) -> torch.Tensor:
    t = torch.as_tensor(t).detach().cpu()
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(()).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or (B,)=({batch},), got shape {tuple(t.shape)}")
    return t


def q_sample(sched: Schedule, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4).

    x0, noise: (B, ...) in the [-1, 1] data space; t: scalar or (B,) 0-based timesteps.
    Returns x_t with x0's shape and dtype.
    """
    a, s = sched.alpha_sigma(_as_t(t, x0.shape[0]))
    return _coef(a, x0) * x0 + _coef(s, x0) * noise


def predict_x0(sched: Schedule, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """x0 estimate from an eps prediction: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). Shapes as x_t."""
    a, s = sched.alpha_sigma(_as_t(t, x_t.shape[0]))
    return (x_t - _coef(s, x_t) * eps) / _coef(a, x_t)


def predict_eps(sched: Schedule, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
    """eps implied by an x0 estimate: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Not defined at t = -1."""
    a, s = sched.alpha_sigma(_as_t(t, x_t.shape[0]))
    return (x_t - _coef(a, x_t) * x0) / _coef(s, x_t)


def eps_loss(model, sched: Schedule, x0: torch.Tensor, y: torch.Tensor | None, t, noise: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
    """Simple DDPM loss ||eps - eps_theta(x_t, t, y)||^2 (Diff-MI's L_prior and pretraining loss).

    model: callable (x_t, t, y) -> eps. x0, noise: (B, C, H, W) in [-1, 1]; y: (B,) long or None
    (forwarded as is); t: (B,) 0-based timesteps. reduction: "mean" (a scalar, the MSE over all
    elements, as guided-diffusion's mean over the batch of per-sample means), "none" (B,) per sample.
    """
    t_vec = torch.as_tensor(t, device=x0.device)
    if t_vec.dim() == 0:
        t_vec = t_vec.expand(x0.shape[0])
    x_t = q_sample(sched, x0, t_vec, noise)
    eps = model(x_t, t_vec, y)
    per_sample = F.mse_loss(eps, noise, reduction="none").flatten(1).mean(1)  # (B,)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

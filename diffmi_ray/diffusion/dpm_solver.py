"""DPM-Solver++(2M): multistep second-order solver in data-prediction form.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2, on the discrete linear-beta schedule (schedule.py: fractional t interpolate
log alpha linearly, t = -1 is clean data). Diff-MI samples x_0 = D(x_T, y) with it in 10 steps
and back-propagates the classifier loss through the whole chain, so nothing here disables grad.

Notation map (code -> paper; time points t_0 > t_1 > ... > t_n, x given at t_0):

    alpha_i, sigma_i      alpha_{t_i} = sqrt(abar), sigma_{t_i} = sqrt(1 - abar)
    lam_i                 lambda_{t_i} = log(alpha_{t_i} / sigma_{t_i})
    h_i                   h_i = lambda_{t_i} - lambda_{t_{i-1}}
    d_i                   x_theta(x_{t_i}, t_i) = (x - sigma eps_theta) / alpha   (data prediction)
    r_i                   r_i = h_{i-1} / h_i

    step 1 (and first-order steps):
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) d_{i-1}
    steps i >= 2 (second order, multistep):
        D_i = (1 + 1/(2 r_i)) d_{i-1} - 1/(2 r_i) d_{i-2}
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i

This is the "dpmsolver" (= diffusers "midpoint") second-order form used by both the official
DPM-Solver code and diffusers. A step onto t = -1 (sigma = 0, h = inf) is first order and
returns d_{i-1} exactly (diffusers' final_sigmas_type="zero").

Model evaluations: n steps evaluate the model n times, at t_0 .. t_{n-1}; the returned
``pred_x0s[i]`` is d_i (the x0 prediction at t_i). Diff-MI's fine-tuning loss uses 8 tensors for
10 steps: d_3 .. d_9 and the final sample (official ``return_pred_x0=True``; see
:meth:`DPMSolverOutput.official_finetune_targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from diffmi_ray.diffusion.schedule import Schedule
from diffmi_ray.diffusion.timesteps import dpm_solver_timesteps

__all__ = ["DPMSolverOutput", "dpm_solver_pp_2m"]


@dataclass
class DPMSolverOutput:
    sample: torch.Tensor           # x at t_n, (B, C, H, W)
    pred_x0s: list[torch.Tensor]   # d_0 .. d_{n-1}: x0 prediction of each model evaluation

    def official_finetune_targets(self, order: int = 2) -> list[torch.Tensor]:
        """The official Diff-MI fine-tuning outputs: d_{order+1} .. d_{n-1} plus the final sample.

        For n = 10 steps this is d_3 .. d_9 and the sample: 8 tensors (the official DPM-Solver
        collects the data predictions of the steps after the warm-up, ``step > order``).
        """
        return list(self.pred_x0s[order + 1:]) + [self.sample]


def dpm_solver_pp_2m(model, sched: Schedule, x: torch.Tensor, timesteps: Sequence[float] | None = None,
                     y: torch.Tensor | None = None, *, n: int = 10, lower_order_final: bool | None = None,
                     return_intermediates: bool = False,
                     checkpoint_steps: bool = False) -> torch.Tensor | DPMSolverOutput:
    """Integrate the diffusion ODE from timesteps[0] to timesteps[-1] with DPM-Solver++(2M).

    Args:
        model: ``(x, t, y) -> eps`` (a U-Net or CFGModel); t is passed as a (B,) float32 tensor
            of 0-based, possibly fractional times.
        sched: the noise schedule.
        x: (B, C, H, W) state at timesteps[0] (x_T ~ N(0, I) to sample).
        timesteps: n + 1 descending time points, -1 allowed as the last one (clean). Default
            ``dpm_solver_timesteps(n)``: the official Diff-MI grid 999 -> 0 (time-uniform).
        y: (B,) long labels passed to the model (None passes None).
        n: number of steps when ``timesteps`` is None.
        lower_order_final: use a first-order final step. None = the official DPM-Solver rule
            (first order iff n < 10; 10-step Diff-MI sampling is second order to the end).
            diffusers uses it when n < 15. Forced when the chain ends at -1.
        return_intermediates: also return every x0 prediction (DPMSolverOutput).
        checkpoint_steps: wrap each model evaluation in non-reentrant torch.utils.checkpoint, so
            backprop through the chain keeps only each step's input, not the U-Net activations of
            all n evaluations (peak memory ~ one evaluation; costs one extra forward per step).
            Gradients are identical.

    Returns x at timesteps[-1] (B, C, H, W), or DPMSolverOutput(sample, pred_x0s).
    """
    ts = [float(t) for t in (dpm_solver_timesteps(n) if timesteps is None else timesteps)]
    n = len(ts) - 1
    if n < 1:
        raise ValueError("timesteps needs at least 2 points (1 step)")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
    if ts[-1] < -1 or ts[0] > sched.num_timesteps - 1 or -1 in ts[:-1]:
        raise ValueError(f"timesteps must lie in [-1, {sched.num_timesteps - 1}] with -1 only last, got {ts}")
    if lower_order_final is None:
        lower_order_final = n < 10

    alpha, sigma = (v.tolist() for v in sched.alpha_sigma(torch.tensor(ts, dtype=torch.float64)))
    lam = sched.lambda_(torch.tensor(ts, dtype=torch.float64)).tolist()

    def data_pred(x_in: torch.Tensor, i: int) -> torch.Tensor:
        t_vec = torch.full((x_in.shape[0],), ts[i], device=x_in.device, dtype=torch.float32)
        eps = model(x_in, t_vec, y)
        return (x_in - sigma[i] * eps) / alpha[i]

    def evaluate(x_in: torch.Tensor, i: int) -> torch.Tensor:
        if checkpoint_steps and torch.is_grad_enabled():
            return checkpoint(data_pred, x_in, i, use_reentrant=False)
        return data_pred(x_in, i)

    preds: list[torch.Tensor] = []
    for i in range(1, n + 1):
        preds.append(evaluate(x, i - 1))  # d_{i-1}
        if ts[i] == -1:  # sigma_i = 0: the exact first-order limit is the data prediction itself
            x = preds[-1]
            continue
        h = lam[i] - lam[i - 1]
        phi = math.expm1(-h)  # e^{-h} - 1
        first_order = i == 1 or (lower_order_final and i == n)
        if first_order:
            d = preds[-1]
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            d = (1.0 + 0.5 / r) * preds[-1] - (0.5 / r) * preds[-2]
        x = (sigma[i] / sigma[i - 1]) * x - (alpha[i] * phi) * d
        if len(preds) > 2 and not return_intermediates:
            preds[-3] = None  # free what the multistep update no longer needs
    if return_intermediates:
        return DPMSolverOutput(sample=x, pred_x0s=preds)
    return x

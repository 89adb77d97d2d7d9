"""Diffusion math: schedules, forward noising, the eps loss, guidance and few-step samplers.

Pure functions: no device state, no I/O; the network is an argument (any ``(x, t, y) -> eps``
callable) and randomness is injected (noise tensors or a torch.Generator). Timesteps are 0-based
(0 = least noisy); -1 denotes clean data (abar = 1) as a sampler end point. Guidance has one
formula, ``w * eps(y) - (w - 1) * eps(null)`` (:class:`CFGModel`).

Modules: ``schedule`` (linear betas, q_sample, predict_x0, eps_loss), ``guidance`` (CFGModel),
``timesteps`` (sub-sequences), ``ddim`` (DDIM, eta), ``dpm_solver`` (DPM-Solver++ 2M).
"""

from diffmi_ray.diffusion.ddim import DDIMOutput, DDIMStep, ddim_denoise, ddim_sample, ddim_step, ddim_update
from diffmi_ray.diffusion.dpm_solver import DPMSolverOutput, dpm_solver_pp_2m
from diffmi_ray.diffusion.guidance import CFGModel
from diffmi_ray.diffusion.schedule import Schedule, eps_loss, linear_schedule, predict_eps, predict_x0, q_sample
from diffmi_ray.diffusion.timesteps import ddim_timesteps, dpm_solver_timesteps, uniform_timesteps

__all__ = [
    "CFGModel", "DDIMOutput", "DDIMStep", "DPMSolverOutput", "Schedule",
    "ddim_denoise", "ddim_sample", "ddim_step", "ddim_timesteps", "ddim_update", "dpm_solver_pp_2m",
    "dpm_solver_timesteps", "eps_loss", "linear_schedule", "predict_eps", "predict_x0", "q_sample",
    "uniform_timesteps",
]

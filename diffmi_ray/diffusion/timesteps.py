"""Timestep sub-sequences for the few-step samplers (0-based, descending, -1 = clean).

A sampler chain is described by n + 1 time points ``t_0 > t_1 >= ... >= t_n``: x is given at
t_0, each of the n steps moves it from t_{i} to t_{i+1}, and the model is evaluated at
t_0 .. t_{n-1}. The end point -1 means clean data (abar = 1), so a chain ending there returns an
x0 estimate; an end point 0 stops at the least-noisy training step (DPM-Solver's t_end = 1/T).
"""

from __future__ import annotations

import torch

__all__ = ["uniform_timesteps", "ddim_timesteps", "dpm_solver_timesteps"]


def uniform_timesteps(t_start: float, t_end: float, n: int, integer: bool = True) -> list:
    """n + 1 points evenly spaced from t_start down to t_end (inclusive), rounded if ``integer``."""
    if n < 1:
        raise ValueError(f"need n >= 1 steps, got {n}")
    if not t_start > t_end >= -1:
        raise ValueError(f"need t_start > t_end >= -1, got {t_start}, {t_end}")
    pts = torch.linspace(float(t_start), float(t_end), n + 1, dtype=torch.float64)
    if integer:
        pts = torch.round(pts).long()
        if len(set(pts.tolist())) != n + 1:
            raise ValueError(f"{n} integer steps do not fit between {t_start} and {t_end}")
    return pts.tolist()


def ddim_timesteps(t_start: int, n: int, t_end: int = -1) -> list[int]:
    """Integer DDIM points ``[t_start, ..., t_end]`` (n steps, default ending at clean data).

    Examples (T = 1000): ``ddim_timesteps(999, 10)`` = [999, 899, ..., 99, -1] (diffusers'
    "trailing" spacing with set_alpha_to_one); ``ddim_timesteps(99, 10)`` = [99, 89, ..., 9, -1],
    Diff-MI's final "re-noise to t = 100 and denoise in 10 DDIM steps" in 0-based time.
    """
    return uniform_timesteps(t_start, t_end, n, integer=True)


def dpm_solver_timesteps(n: int = 10, t_start: float = 999, t_end: float = 0, integer: bool = False) -> list:
    """DPM-Solver "time_uniform" points: linspace(t_start, t_end, n + 1), fractional by default.

    The defaults reproduce the official Diff-MI fine-tuning sampler: continuous time s from 1 to
    1/T in 10 uniform steps, i.e. 0-based t = 999, 899.1, ..., 99.9, 0 (the model sees these
    fractional t; the schedule interpolates log alpha between integer steps). Use ``t_end=-1`` to
    finish at clean data instead, ``integer=True`` for integer points (diffusers parity).
    """
    return uniform_timesteps(t_start, t_end, n, integer=integer)

"""Targeted L2 projected gradient descent on a classifier (Diff-MI's final refinement).

Diff-MI (paper §III-B.2, PROTOCOL.md §3) ends its attack with a targeted L2 PGD on the target T:
minimise CE(T(x'), y) over ``||x' - x||_2 <= eps`` and ``x' in [0, 1]``, starting at a random point
of the ball's surface, and return the iterate with the best T score per sample. This is the
"targeted, constraint '2', use_best" attack of the MadryLab ``robustness`` package that the official
code calls, written here as one pure function.

Notation (one sample; all norms are L2 over every pixel of the (C, H, W) image, [0, 1] units)::

    x          the clean image (centre of the ball)
    x_k        iterate k; x_0 = clip(x + eps * d / ||d||), d ~ N(0, I)    (random start)
    g_k        grad_x CE(T(x_k), y)
    x_{k+1}    clip(x + renorm_eps(x_k - step * g_k / ||g_k|| - x))          (descent, then projection)

``renorm_eps`` scales a difference down to norm eps when it is longer; ``clip`` clamps to [0, 1]
(which can only shorten the difference, since x is in [0, 1]). The candidates for the best iterate
are x_0 .. x_K (the clean x itself is not one, as in the official code); the best is the one with
the lowest CE, i.e. the highest softmax probability of y.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pgd_l2"]

_TINY = 1e-10  # guards the per-sample normalisations (the reference implementation's constant)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x: from one generator, one per sample, or the global RNG."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in gens]).to(x)


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """(B,) L2 norms, reshaped to broadcast over (B, C, H, W)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    diff = x_adv - x
    diff = diff.renorm(p=2, dim=0, maxnorm=eps)  # per sample: scale down to norm eps if longer
    return (x + diff).clamp(0.0, 1.0)


def pgd_l2(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, iterations: int,
           random_start: bool = True,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Targeted L2 PGD: the best of the iterates that minimise CE(model(x'), y) in the eps ball.

    Args:
        model: classifier, ``model(x) -> logits (B, K)`` on [0, 1] images (eval mode; its
            parameters are not updated, their ``requires_grad`` does not matter).
        x: (B, C, H, W) images in [0, 1] (the centres of the balls).
        y: (B,) long target labels.
        eps: ball radius (L2 over the whole image, [0, 1] pixel units). eps = 0 returns x.
        step_size: L2 length of each step (along the normalised negative gradient).
        iterations: number of steps K (K + 1 candidates: the start and every step's result).
        random_start: start on the sphere of radius eps around x (clipped to [0, 1]); else at x.
        generator: randomness of the random start: one torch.Generator, a sequence of B generators
            (one per sample, so a sample's result does not depend on its batch), or None (global RNG).

    Returns:
        (B, C, H, W) in [0, 1], detached; per sample the candidate with the lowest CE (highest
        softmax probability of y), ties kept at the earlier iterate.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    x = x.detach()
    y = y.to(x.device)
    if eps <= 0:
        return x.clone()
    if random_start:
        d = _randn_like(x, generator)
        x_adv = (x + eps * d / (_per_sample_norm(d) + _TINY)).clamp(0.0, 1.0)
    else:
        x_adv = x.clone()

    best = x_adv.clone()
    best_loss = torch.full((x.shape[0],), float("inf"), device=x.device)
    with torch.enable_grad():
        for k in range(iterations + 1):
            x_adv = x_adv.detach().requires_grad_(True)
            losses = F.cross_entropy(model(x_adv), y, reduction="none")  # (B,)
            with torch.no_grad():
                better = losses < best_loss
                best[better] = x_adv[better]
                best_loss = torch.where(better, losses.detach(), best_loss)
            if k == iterations:
                break
            (grad,) = torch.autograd.grad(losses.sum(), [x_adv])  # per-sample gradients
            with torch.no_grad():
                step = grad / (_per_sample_norm(grad) + _TINY)
                x_adv = _project(x_adv - step_size * step, x, eps)
    return best.detach()

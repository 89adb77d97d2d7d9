"""Latent-space attack pieces shared by the GAN-prior attacks (GMI, KED-MI, PLG-MI, VMI, PPA).

* Reproducible per-sample randomness: :func:`restart_ids`, :func:`initial_latents` and
  :func:`per_sample_uniform` key every draw by (class, repeat, restart, stream), so a sample's result
  does not depend on the batch it is optimised in (``conventions.sample_generator``).
* :func:`optimise`: the plain optimisation loop (loss -> backward -> step -> optional projection such
  as :func:`clamp_`), with a finite-loss check.
* :func:`per_sample_scale`: turns a batch mean into a sum of per-sample terms over a *fixed*
  normaliser, so every sample's gradient is the same whatever the batch size (this matters for SGD;
  Adam is invariant to the scale).
* :func:`select_best`: keep, per sample, the restart with the highest target score.
* :func:`augment` / :func:`sample_augment_params`: PLG-MI's random transforms (kornia in the official
  code: RandomResizedCrop(scale 0.8-1, ratio 1), ColorJitter(brightness 0.2, contrast 0.2),
  RandomHorizontalFlip, RandomRotation(5 deg)) as one differentiable batched op whose random
  parameters are given per sample, so they can come from per-sample generators.

Images are (B, C, H, W) in [0, 1] (the package convention).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmi_ray.conventions import sample_generator

#: random-stream tags (the last id of a sample's generator key)
STREAM_INIT = 0   # initial latents
STREAM_AUG = 1    # augmentation parameters
STREAM_EPS = 2    # reparameterisation noise of learned distributions
STREAM_EVAL = 3   # noise of a final scoring / selection pass
STREAM_SAMPLE = 4  # noise of the output samples of a learned distribution


# ----------------------------------------------------------------------------------------------
# reproducible per-sample randomness
# ----------------------------------------------------------------------------------------------


def restart_ids(ids: list[tuple[int, int]], restarts: int) -> list[tuple[int, int, int]]:
    """(class, repeat, restart) keys of R restarts of each sample, restart-major: row r*N + i."""
    return [(c, j, r) for r in range(restarts) for (c, j) in ids]


def initial_latents(z_dim: int, seed: int, keys: list[tuple[int, ...]], device: torch.device | str = "cpu",
                    stream: int = STREAM_INIT) -> Tensor:
    """Standard-normal latents (len(keys), z_dim), row i from ``sample_generator(seed, *keys[i], stream)``."""
    rows = [torch.randn(z_dim, generator=sample_generator(seed, *k, stream)) for k in keys]
    return torch.stack(rows).to(device)


def per_sample_uniform(shape: tuple[int, ...], seed: int, keys: list[tuple[int, ...]],
                       stream: int = STREAM_AUG) -> Tensor:
    """U[0, 1) draws (len(keys), *shape), row i from ``sample_generator(seed, *keys[i], stream)`` (CPU)."""
    return torch.stack([torch.rand(shape, generator=sample_generator(seed, *k, stream)) for k in keys])


# ----------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------


def per_sample_scale(batch_mean: Tensor, n: int, normaliser: float) -> Tensor:
    """``batch_mean * n / normaliser``: the sum of n per-sample losses divided by a fixed normaliser.

    With ``normaliser`` = the configured batch size this equals the official batch mean for a full
    batch, and each sample's gradient no longer depends on how many samples share the batch.
    """
    return batch_mean * (float(n) / float(normaliser))


def clamp_(z: Tensor, bound: float) -> None:
    """In place: z <- clamp(z, -bound, bound) (GMI keeps its latents in [-1, 1])."""
    with torch.no_grad():
        z.clamp_(-bound, bound)


def optimise(params: Iterable[Tensor], optimizer: torch.optim.Optimizer, loss_fn: Callable[[int], Tensor],
             iterations: int, *, after_step: Callable[[], None] | None = None, name: str = "attack loss",
             log: Callable[[str], None] | None = None, log_every: int = 0) -> float:
    """``iterations`` steps of loss_fn(i).backward(); optimizer.step(); after_step(). Returns the last loss.

    ``params``: the optimised tensors (those of ``optimizer``); they are checked to be finite at the end.
    Raises FloatingPointError when the loss or a parameter becomes NaN or infinite (the attack diverged).
    """
    params = list(params)
    last = float("nan")
    for i in range(iterations):
        loss = loss_fn(i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        last = float(loss.detach())
        if not math.isfinite(last):
            raise FloatingPointError(f"{name} became {last} at step {i}; lower the learning rate")
        if log is not None and log_every and (i + 1) % log_every == 0:
            log(f"step {i + 1}/{iterations}: {name}={last:.4f}")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise FloatingPointError(f"{name}: the optimised parameters became non-finite")
    return last


@torch.no_grad()
def label_scores(target: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax probability of each label under the target: images (N, C, H, W) in [0, 1] -> (N,) on CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        logits = target(images[s:s + batch_size])
        out.append(logits.softmax(-1).gather(1, labels[s:s + batch_size].view(-1, 1)).squeeze(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def select_best(candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, the restart with the highest score.

    candidates (R, N, ...) and scores (R, N) -> (best (N, ...), best scores (N,), restart index (N,)).
    Ties keep the lowest restart index.
    """
    idx = scores.argmax(dim=0)  # (N,) first maximum
    n = torch.arange(scores.shape[1])
    return candidates[idx.to(candidates.device), n.to(candidates.device)], scores[idx, n], idx


# ----------------------------------------------------------------------------------------------
# augmentation (PLG-MI's transforms)
# ----------------------------------------------------------------------------------------------

#: uniform draws one augmentation of one image consumes (see :func:`augment`)
AUG_DRAWS = 10


def augment(x: Tensor, u: Tensor, *, crop_scale: tuple[float, float] = (0.8, 1.0), brightness: float = 0.2,
            contrast: float = 0.2, color_p: float = 1.0, flip_p: float = 0.5, rotate_p: float = 0.5,
            degrees: float = 5.0) -> Tensor:
    """PLG-MI's random transforms with the randomness given: x (B, C, H, W) in [0, 1], u (B, AUG_DRAWS) in [0, 1).

    Per image b (draws ``u[b, k]``):

    * colour jitter with probability ``color_p`` (u0): brightness x*f, f ~ U(1-brightness, 1+brightness)
      (u1), and contrast m + g*(x - m), m the image's mean grey level, g ~ U(1-contrast, 1+contrast)
      (u2), in random order (u3), clamped to [0, 1] (torchvision / kornia ColorJitter);
    * random resized crop of relative area s ~ U(crop_scale) with aspect ratio 1 (u4) at a uniform
      position (u5, u6), resized back to H x W;
    * horizontal flip with probability ``flip_p`` (u7);
    * rotation by U(-degrees, degrees) (u9) with probability ``rotate_p`` (u8), zero padding.

    The three geometric steps are one affine resampling (bilinear), so the result is differentiable in x.
    """
    B, C, H, W = x.shape
    u = u.to(device=x.device, dtype=x.dtype)

    # colour (kornia ColorJitter: brightness_factor multiplies, contrast around the grey mean)
    on = (u[:, 0] < color_p).to(x.dtype).view(B, 1, 1, 1)
    bf = (1.0 - brightness + 2.0 * brightness * u[:, 1]).view(B, 1, 1, 1)
    cf = (1.0 - contrast + 2.0 * contrast * u[:, 2]).view(B, 1, 1, 1)
    bright_first = (u[:, 3] < 0.5).view(B, 1, 1, 1)

    def _contrast(t: Tensor) -> Tensor:
        grey = t.mean(dim=1, keepdim=True) if C == 1 else (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3])
        m = grey.mean(dim=(1, 2, 3), keepdim=True)
        return (m + cf * (t - m)).clamp(0.0, 1.0)

    def _bright(t: Tensor) -> Tensor:
        return (t * bf).clamp(0.0, 1.0)

    jit = torch.where(bright_first, _contrast(_bright(x)), _bright(_contrast(x)))
    x = on * jit + (1.0 - on) * x

    # geometry: out(p) = x(A p + t) in normalised coordinates, A = sqrt(s) * Flip * Rot(-theta)
    lo, hi = crop_scale
    side = torch.sqrt(lo + (hi - lo) * u[:, 4])  # relative side of the square crop
    cx = (2.0 * u[:, 5] - 1.0) * (1.0 - side)
    cy = (2.0 * u[:, 6] - 1.0) * (1.0 - side)
    flip = torch.where(u[:, 7] < flip_p, -1.0, 1.0).to(x.dtype)
    theta = torch.where(u[:, 8] < rotate_p, (2.0 * u[:, 9] - 1.0) * degrees, torch.zeros_like(u[:, 9]))
    theta = theta * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Rot(-theta) = [[cos, sin], [-sin, cos]]; the flip negates the x row's input column
    a11, a12 = side * flip * cos, side * flip * sin
    a21, a22 = -side * sin, side * cos
    mat = torch.stack([torch.stack([a11, a12, cx], 1), torch.stack([a21, a22, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(mat, [B, C, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sample_augment_params(n: int, generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1) draws (n, AUG_DRAWS) for :func:`augment` from one generator (training: one per batch)."""
    return torch.rand(n, AUG_DRAWS, generator=generator)


__all__ = ["AUG_DRAWS", "STREAM_AUG", "STREAM_EPS", "STREAM_EVAL", "STREAM_INIT", "STREAM_SAMPLE", "augment", "clamp_",
           "initial_latents", "label_scores", "optimise", "per_sample_scale", "per_sample_uniform", "restart_ids",
           "sample_augment_params", "select_best"]

"""Conventions that every module of diffmi_ray uses, written down once.

Pixel range
    Images cross module boundaries as float tensors in [0, 1], shape (B, C, H, W).
    The diffusion model works in [-1, 1]; convert with :func:`to_pm1` / :func:`from_pm1`
    at the edge of the diffusion code, nowhere else.

Timesteps
    0-based: t = 0 is the least noisy step, t = T-1 (999 at paper scale) the noisiest.

Guidance
    One formula: ``eps = w * eps(x, y) - (w - 1) * eps(x, null)``. w = 1 is the purely
    conditional model, w = 0 the unconditional one; the paper and the official attack use w = 3.
    (The official guided-diffusion sampler's w' equals our w - 1.)

Null class
    The null (unconditional) label index is ``num_classes``; a class-conditional model therefore has
    ``num_classes + 1`` label-embedding rows.

Classifiers
    ``forward(x)`` returns logits (B, num_classes); ``features(x)`` returns penultimate features (B, D).

Seeds
    Every stage takes a seed; per-sample noise comes from :func:`sample_generator` so it does not
    depend on the batch a sample lands in.
"""

from __future__ import annotations

import torch


def to_pm1(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def from_pm1(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (no clamping)."""
    return (x + 1.0) * 0.5


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, C, H, W) -> (B, C, size, size): bilinear with antialiasing, differentiable; a no-op
    at the same size. The one resize used where a model's image size differs from the data's."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True)


def null_class(num_classes: int) -> int:
    """Index of the null label of a class-conditional model with ``num_classes`` real classes."""
    return num_classes


def sample_generator(seed: int, *ids: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer ids (e.g. class, repeat index).

    Noise drawn for one (class, repeat) pair is then the same whatever batch it is computed in.
    """
    h = seed & 0xFFFFFFFF
    for i in ids:
        h = (h * 1_000_003 + int(i) + 0x9E3779B9) & 0xFFFFFFFFFFFF
    g = torch.Generator(device="cpu")
    g.manual_seed(h)
    return g


def per_sample_noise(shape: tuple[int, ...], seed: int, ids: list[tuple[int, ...]],
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal noise (len(ids), *shape), row i drawn from ``sample_generator(seed, *ids[i])``."""
    rows = [torch.randn(shape, generator=sample_generator(seed, *i)) for i in ids]
    return torch.stack(rows).to(device=device, dtype=dtype)

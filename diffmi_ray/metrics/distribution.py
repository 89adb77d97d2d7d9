"""Set-level metrics over feature vectors: Fréchet distance and precision/recall/density/coverage.

Both take features (N, D) of two image sets, computed once per image by :mod:`.features`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor


def gaussian_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64 numpy (pytorch-fid's convention)."""
    a = feats.detach().cpu().double().numpy()
    return a.mean(axis=0), np.cov(a, rowvar=False)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed by pytorch-fid's
    ``calculate_frechet_distance`` (scipy ``sqrtm``, eps-regularised when singular). Units: squared
    feature units. FID is this over Inception pool3 features; ``fid_evalnet`` over E's features.
    Needs >= 2 vectors per set; raises ValueError otherwise (or if sqrtm leaves a large imaginary part).
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError(f"needs >= 2 feature vectors per set, got {feats_a.shape[0]} and {feats_b.shape[0]}")
    mu_a, s_a = gaussian_stats(feats_a)
    mu_b, s_b = gaussian_stats(feats_b)
    with warnings.catch_warnings():  # scipy >= 1.16 deprecates sqrtm(disp=...), which pytorch-fid passes
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(calculate_frechet_distance(mu_a, np.atleast_2d(s_a), mu_b, np.atleast_2d(s_b)))


def _pairwise_dist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances (N_a, N_b) in float64."""
    return torch.cdist(a.double(), b.double()).clamp_min_(0)


def knn_radii(feats: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance (N,) from each vector to its k-th nearest neighbour in the same set (self excluded).

    Computed in row chunks of ``chunk`` vectors to bound memory at chunk x N distances.
    """
    n = feats.shape[0]
    if n < k + 1:
        raise ValueError(f"needs more than k={k} vectors per set, got {n}")
    out = []
    for s in range(0, n, chunk):
        d = _pairwise_dist(feats[s:s + chunk], feats)
        out.append(torch.kthvalue(d, k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def prdc(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., ICML 2020; Kynkäänniemi et al. 2019).

    real (N_r, D): features of private images; fake (N_f, D): features of reconstructions.
    With B(x, r) the open ball and r_k(x) the distance of x to its k-th neighbour in its own set:

    - precision = mean_j 1[exists i: ||f_j - r_i|| < r_k(r_i)]
    - recall    = mean_i 1[exists j: ||r_i - f_j|| < r_k(f_j)]
    - density   = 1/k * mean_j sum_i 1[||f_j - r_i|| < r_k(r_i)]
    - coverage  = mean_i 1[min_j ||r_i - f_j|| < r_k(r_i)]

    Strict inequalities, as the reference ``prdc`` package (clovaai/generative-evaluation-prdc).
    Needs more than k vectors per set. (The Diff-MI code's per-class ``PRCD`` differs: it first cuts
    the larger set to the smaller one's size, and its precision/recall only test the ball of the
    nearest neighbour; we implement the published definition.)
    """
    radii_r = knn_radii(real, k)
    radii_f = knn_radii(fake, k)
    d = _pairwise_dist(real, fake)                  # (N_r, N_f)
    inside_r = d < radii_r[:, None]                 # fake j inside the ball of real i
    return {
        "precision": inside_r.any(dim=0).double().mean().item(),
        "recall": (d < radii_f[None, :]).any(dim=1).double().mean().item(),
        "density": (inside_r.sum(dim=0).double().mean() / k).item(),
        "coverage": (d.min(dim=1).values < radii_r).double().mean().item(),
    }


PRDC_NAMES = ("precision", "recall", "density", "coverage")

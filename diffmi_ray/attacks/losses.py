"""Identity losses shared by all attacks (paper §III-C; PROTOCOL.md §3-4). Each returns the batch mean.

Notation: logits l (B, K) of the target, labels y (B,), features p (B, D) (penultimate layer of T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(l, y) averaged over the batch."""
    return F.cross_entropy(logits, y)


def _other_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K-1) logits of every class except y, in class order."""
    B, K = logits.shape
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[torch.arange(B, device=logits.device), y] = False
    return logits[mask].view(B, K - 1)


def max_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_MM = -l_y + max_{j != y} l_j (PLG-MI), batch mean."""
    real = logits.gather(1, y.view(-1, 1)).squeeze(1)
    return (-real + _other_logits(logits, y).max(dim=1).values).mean()


def top_k_loss(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """L_topk = -l_y + mean of the k largest l_j, j != y (Diff-MI). k = 0 gives -l_y; k = 1 is L_MM.

    Raises ValueError unless 0 <= k < K (K = number of classes).
    """
    B, K = logits.shape
    if not 0 <= k < K:
        raise ValueError(f"top-k loss needs 0 <= k < number of classes ({K}), got k={k}")
    real = logits.gather(1, y.view(-1, 1)).squeeze(1)
    if k == 0:
        return (-real).mean()
    top = _other_logits(logits, y).topk(k, dim=1).values.mean(dim=1)
    return (-real + top).mean()


def p_reg_loss(features: torch.Tensor, centroids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_preg = ||p_x - p_reg,y||^2 averaged over the batch and the feature dimension (the official
    code's mean squared error). features (B, D); centroids (K, D) per-class feature centroids."""
    return F.mse_loss(features, centroids[y])


def poincare_loss(logits: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """PPA's Poincaré loss: hyperbolic distance between the L1-normalised logits u and the one-hot
    target v scaled to the ball (v = 1 - eps at class y), d = arccosh(1 + 2|u-v|^2/((1-|u|^2)(1-|v|^2))).

    Batch mean. Struppek et al., ICML 2022, eq. (3).
    """
    u = logits / logits.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    v = F.one_hot(y, logits.shape[1]).to(logits.dtype) * (1.0 - eps)
    uu = (u * u).sum(1)
    vv = (v * v).sum(1)
    duv = ((u - v) ** 2).sum(1)
    delta = 2.0 * duv / ((1.0 - uu).clamp_min(eps) * (1.0 - vv).clamp_min(eps))
    return torch.acosh(1.0 + delta).mean()


def l_cls(logits: torch.Tensor, y: torch.Tensor, *, loss: str = "topk_preg", k: int = 20, alpha: float = 1.0,
          features: torch.Tensor | None = None, centroids: torch.Tensor | None = None) -> torch.Tensor:
    """Diff-MI's L_cls by name: ``topk_preg`` = top-k + alpha * p-reg (p-reg skipped when alpha = 0),
    ``ce`` = cross entropy, ``max_margin`` = max-margin."""
    if loss == "ce":
        return cross_entropy_loss(logits, y)
    if loss == "max_margin":
        return max_margin_loss(logits, y)
    if loss != "topk_preg":
        raise ValueError(f"unknown L_cls {loss!r}; valid: topk_preg, ce, max_margin")
    out = top_k_loss(logits, y, k)
    if alpha:
        if features is None or centroids is None:
            raise ValueError("p-reg needs features and class centroids")
        out = out + alpha * p_reg_loss(features, centroids, y)
    return out

"""BiDO: bilateral dependency optimisation (Peng et al., KDD 2022), as a classifier-training regulariser.

BiDO trains the classifier with

    L = CE(f(X), Y) + sum_j [ lambda_x * dep(X, Z_j) - lambda_y * dep(Z_j, Y) ]

over hidden representations Z_j (classifiers expose them via ``forward_with_hidden``): it lowers the
dependence of each layer on the input (less for an inversion attack to recover) and keeps each
layer informative about the label. ``dep`` is a kernel dependence measure on a mini-batch of m
samples; this module gives the two used by the authors' code, both pure functions of tensors:

* ``measure='hsic'`` -> :func:`nhsic`, the *normalised* HSIC of the official code
  (Fukumizu et al.'s normalised cross-covariance operator, estimated with a ridge eps*m):
  ``nHSIC(X, Z) = tr(R_X R_Z)`` with ``R_A = K~_A (K~_A + eps m I)^{-1}`` and ``K~_A = K_A H``, where
  ``H = I - 11^T/m`` centres. It lies in [0, m - 1] (R_A is a shrunk projector onto the centred span).
* ``measure='coco'`` -> :func:`coco`, the constrained covariance as the official code computes it:
  ``sqrt(||(H K_X H)(H K_Z H)||_F) / m`` (Frobenius norm, not the spectral norm of Gretton et al.).

:func:`hsic` (the plain biased estimator ``tr(K H L H) / (m-1)^2``) is provided for reference and tests.

Kernels (m x m Gram matrices of the batch, inputs flattened to (m, d)):

* Gaussian, as the official code scales it: ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2 d))``, i.e.
  ``sigma`` is a per-dimension bandwidth (official: sigma = 5 for every layer).
* linear: ``k(a, b) = a . b``.

The paper uses Gaussian kernels throughout; the official training script's default (``--ktype
linear``) puts a *linear* kernel on the one-hot labels Y (the input and hidden kernels stay Gaussian).
Our default is the paper's (``kernel_y='gaussian'``); ``kernel_y='linear'`` reproduces the script.
The m x m algebra runs in float64 for a stable inverse; results are returned in the input dtype.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

Kernel = Literal["gaussian", "linear"]
Measure = Literal["hsic", "coco"]

#: ridge of the normalised HSIC, multiplied by the batch size m (official value 1e-5)
NHSIC_EPS = 1e-5


def _flat(x: Tensor) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"expected a batch (m, ...) with m samples, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances (m, m) between the rows of x (m, ...), flattened; exact zero diagonal."""
    x = _flat(x)
    sq = (x * x).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    d = d.clamp_min(0.0)  # round-off can make it slightly negative
    return d * (1.0 - torch.eye(d.shape[0], dtype=d.dtype, device=d.device))


def gaussian_kernel(x: Tensor, sigma: float) -> Tensor:
    """Gaussian Gram matrix (m, m): exp(-||x_i - x_j||^2 / (2 sigma^2 d)), d = features per sample."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = _flat(x)
    return torch.exp(-sq_distances(x) / (2.0 * sigma * sigma * x.shape[1]))


def linear_kernel(x: Tensor) -> Tensor:
    """Linear Gram matrix (m, m): x_i . x_j of the flattened rows."""
    x = _flat(x)
    return x @ x.T


def kernel_matrix(x: Tensor, kernel: Kernel = "gaussian", sigma: float = 5.0) -> Tensor:
    """Gram matrix (m, m) of the batch x (m, ...) under ``kernel`` ('gaussian' uses ``sigma``)."""
    if kernel == "gaussian":
        return gaussian_kernel(x, sigma)
    if kernel == "linear":
        return linear_kernel(x)
    raise ValueError(f"unknown kernel {kernel!r}; valid: 'gaussian', 'linear'")


def centering(m: int, *, dtype=torch.float64, device=None) -> Tensor:
    """H = I - 11^T / m, shape (m, m)."""
    return torch.eye(m, dtype=dtype, device=device) - torch.full((m, m), 1.0 / m, dtype=dtype, device=device)


def _grams(x: Tensor, y: Tensor, sigma: float, kernel_x: Kernel, kernel_y: Kernel) -> tuple[Tensor, Tensor, Tensor]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples: {x.shape[0]} vs {y.shape[0]} rows")
    if x.shape[0] < 2:
        raise ValueError("a dependence measure needs at least 2 samples")
    k = kernel_matrix(x, kernel_x, sigma).double()
    l = kernel_matrix(y, kernel_y, sigma).double()
    return k, l, centering(x.shape[0], device=k.device)


def hsic(x: Tensor, y: Tensor, *, sigma: float = 5.0, kernel_x: Kernel = "gaussian",
         kernel_y: Kernel = "gaussian") -> Tensor:
    """Biased empirical HSIC (Gretton et al., 2005): tr(K H L H) / (m - 1)^2. Scalar, >= 0.

    x: (m, ...), y: (m, ...) paired samples (flattened per row).
    """
    k, l, h = _grams(x, y, sigma, kernel_x, kernel_y)
    m = k.shape[0]
    return (torch.trace(k @ h @ l @ h) / (m - 1) ** 2).to(x.dtype)


def nhsic(x: Tensor, y: Tensor, *, sigma: float = 5.0, kernel_x: Kernel = "gaussian",
          kernel_y: Kernel = "gaussian", eps: float = NHSIC_EPS) -> Tensor:
    """Normalised HSIC of the official BiDO code: tr(R_x R_y), R = K~ (K~ + eps m I)^{-1}, K~ = K H.

    x: (m, ...), y: (m, ...) paired samples. Scalar in [0, m - 1]; larger = more dependent.
    K~ and (K~ + cI)^{-1} commute (the latter is a function of the former), so R = solve(K~ + cI, K~).
    """
    k, l, h = _grams(x, y, sigma, kernel_x, kernel_y)
    m = k.shape[0]
    ridge = eps * m * torch.eye(m, dtype=k.dtype, device=k.device)
    kc, lc = k @ h, l @ h
    rx = torch.linalg.solve(kc + ridge, kc)
    ry = torch.linalg.solve(lc + ridge, lc)
    return (rx * ry.T).sum().to(x.dtype)


def coco(x: Tensor, y: Tensor, *, sigma: float = 5.0, kernel_x: Kernel = "gaussian",
         kernel_y: Kernel = "gaussian") -> Tensor:
    """COCO as computed by the official BiDO code: sqrt(||(H K H)(H L H)||_F) / m. Scalar, >= 0.

    x: (m, ...), y: (m, ...) paired samples. (The textbook COCO uses the spectral norm; the official
    code's ``torch.norm`` is the Frobenius norm, kept here because it sets the scale of lambda.)
    """
    k, l, h = _grams(x, y, sigma, kernel_x, kernel_y)
    m = k.shape[0]
    prod = (h @ k @ h) @ (h @ l @ h)
    # clamp: d sqrt(u)/du is infinite at 0 (a constant batch), which would turn gradients into NaN
    return (torch.sqrt(torch.linalg.matrix_norm(prod).clamp_min(1e-30)) / m).to(x.dtype)


def dependence(x: Tensor, y: Tensor, *, measure: Measure = "hsic", sigma: float = 5.0,
               kernel_x: Kernel = "gaussian", kernel_y: Kernel = "gaussian") -> Tensor:
    """dep(x, y) with the BiDO measure: 'hsic' -> :func:`nhsic`, 'coco' -> :func:`coco`."""
    if measure == "hsic":
        return nhsic(x, y, sigma=sigma, kernel_x=kernel_x, kernel_y=kernel_y)
    if measure == "coco":
        return coco(x, y, sigma=sigma, kernel_x=kernel_x, kernel_y=kernel_y)
    raise ValueError(f"unknown BiDO measure {measure!r}; valid: 'hsic', 'coco'")


def bido_terms(x: Tensor, hidden_list: Sequence[Tensor], y_onehot: Tensor, *, measure: Measure = "hsic",
               sigma: float = 5.0, kernel_y: Kernel = "gaussian") -> list[tuple[Tensor, Tensor]]:
    """Per-layer (dep(X, Z_j), dep(Z_j, Y)) pairs, for the loss and for logging.

    x: input batch (m, C, H, W) (flattened inside); hidden_list: Z_j, each (m, ...);
    y_onehot: (m, num_classes) float one-hot labels. X and Z_j use Gaussian kernels, Y ``kernel_y``.
    """
    if y_onehot.dim() != 2:
        raise ValueError(f"y_onehot must be (m, num_classes), got shape {tuple(y_onehot.shape)}; "
                         "use torch.nn.functional.one_hot(y, num_classes).float()")
    y = y_onehot.to(dtype=x.dtype if x.is_floating_point() else torch.float32)
    out = []
    for z in hidden_list:
        dxz = dependence(z, x, measure=measure, sigma=sigma)
        dyz = dependence(z, y, measure=measure, sigma=sigma, kernel_y=kernel_y)
        out.append((dxz, dyz))
    return out


def bido_regulariser(x: Tensor, hidden_list: Sequence[Tensor], y_onehot: Tensor, lambda_x: float,
                     lambda_y: float, *, measure: Measure = "hsic", sigma: float = 5.0,
                     kernel_y: Kernel = "gaussian") -> Tensor:
    """BiDO term added to the cross-entropy: sum_j lambda_x * dep(X, Z_j) - lambda_y * dep(Z_j, Y).

    x: input batch (m, C, H, W) in [0, 1]; hidden_list: Z_j (m, ...) from ``forward_with_hidden``;
    y_onehot: (m, num_classes). Returns a scalar tensor (differentiable w.r.t. the Z_j).
    sigma = 5 is the official code's value; the lambdas are tuned per dataset (the official code
    sweeps them; its VMI configs use e.g. lambda_x = 0.1, lambda_y = 2).
    """
    if not hidden_list:
        raise ValueError("bido_regulariser needs at least one hidden representation")
    total = x.new_zeros(()) if x.is_floating_point() else torch.zeros(())
    for dxz, dyz in bido_terms(x, hidden_list, y_onehot, measure=measure, sigma=sigma, kernel_y=kernel_y):
        total = total + lambda_x * dxz - lambda_y * dyz
    return total


__all__ = ["NHSIC_EPS", "bido_regulariser", "bido_terms", "centering", "coco", "dependence", "gaussian_kernel",
           "hsic", "kernel_matrix", "linear_kernel", "nhsic", "sq_distances"]

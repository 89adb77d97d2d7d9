"""One grid point's image grid: private samples above the reconstructions of the same classes.

The evaluate stage calls ``save_image_grid(path, recon, labels, private, private_labels,
n_private_per_class=cfg.grid_private_per_class, max_classes=cfg.grid_max_classes)`` when
``EvaluationConfig.write_grid`` is set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def grid_tensor(recon: Tensor, recon_labels: Tensor, private: Tensor, private_labels: Tensor, *,
                n_private_per_class: int = 2, max_classes: int = 16, padding: int = 2,
                pad_value: float = 1.0) -> Tensor:
    """The grid image (3, H', W') in [0, 1]: one column per class (the first ``max_classes`` labels of
    ``recon_labels``, ascending); the top ``n_private_per_class`` rows are private images of that class,
    the rows below its reconstructions in the order given. Missing cells are black.

    recon (N, C, H, W), private (P, C, H, W) in [0, 1] with the same (C, H, W); labels (N,), (P,).
    """
    from torchvision.utils import make_grid

    if recon.shape[1:] != private.shape[1:] and private.numel():
        raise ValueError(f"recon {tuple(recon.shape[1:])} and private {tuple(private.shape[1:])} differ in shape")
    recon_labels = recon_labels.long().cpu()
    private_labels = private_labels.long().cpu()
    classes = torch.unique(recon_labels)[:max_classes].tolist()
    if not classes:
        raise ValueError("no reconstructions to draw")
    n_rec = max(int((recon_labels == c).sum()) for c in classes)
    blank = torch.zeros(recon.shape[1:], dtype=torch.float32)

    def column(c: int) -> list[Tensor]:
        priv = private[private_labels == c][:n_private_per_class].float().cpu()
        rec = recon[recon_labels == c].float().cpu()
        cells = list(priv) + [blank] * (n_private_per_class - priv.shape[0])
        return cells + list(rec) + [blank] * (n_rec - rec.shape[0])

    cols = [column(c) for c in classes]
    rows = len(cols[0])
    tiles = torch.stack([cols[j][i] for i in range(rows) for j in range(len(classes))])  # row-major
    return make_grid(tiles.clamp(0, 1), nrow=len(classes), padding=padding, pad_value=pad_value)


def save_image_grid(path: str | Path, recon: Tensor, recon_labels: Tensor, private: Tensor,
                    private_labels: Tensor, *, n_private_per_class: int = 2, max_classes: int = 16) -> Path:
    """Write :func:`grid_tensor` as an 8-bit PNG at ``path`` atomically (temp file + os.replace).

    Returns the path. Gray images are drawn as gray RGB.
    """
    path = Path(path)
    g = grid_tensor(recon, recon_labels, private, private_labels,
                    n_private_per_class=n_private_per_class, max_classes=max_classes)
    arr = (g.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())  # (H', W', 3)
    from diffmi_ray.metrics.suite import write_atomic

    return write_atomic(path, lambda f: Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG"),
                        mode="wb", suffix=".png")

"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper — the one guidance formula.

    eps_w(x, t, y) = w * eps(x, t, y) - (w - 1) * eps(x, t, null)
                   = eps(x, t, null) + w * (eps(x, t, y) - eps(x, t, null))

w = 1 is the plain conditional model, w = 0 the unconditional one; Diff-MI uses w = 3 for
fine-tuning, the attack's prior step and the final DDIM denoise. (The official guided-diffusion
sampler of Diff-MI writes (1 + w') eps(y) - w' eps(null), i.e. w' = w - 1; we never use w'.)
The null label is ``num_classes`` (conventions.py).

The wrapper has the same call contract as the U-Net, ``(x, t, y) -> eps``, so every sampler and
loss takes either. It is an nn.Module holding the wrapped model, so ``.parameters()``, ``.to()``
and ``.train()/.eval()`` reach the U-Net.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CFGModel"]


class CFGModel(nn.Module):
    """eps_w = w * eps(x, t, y) - (w - 1) * eps(x, t, null), in ONE batched model call.

    Args:
        model: eps model called as ``model(x, t, y)``; x (B, C, H, W), t (B,), y (B,) long.
        w: guidance scale (float). w == 1 skips the null pass; w == 0 skips the conditional pass.
        null_label: index of the null class (= num_classes of the model).

    forward(x, t, y): x (B, C, H, W); t scalar / (1,) / (B,) 0-based timesteps; y (B,) long.
    The conditional and null halves go through the model as one batch of 2B (cond first), which
    costs one call instead of two and gives identical results for per-sample models (GroupNorm,
    no BatchNorm in the U-Net).
    """

    def __init__(self, model: nn.Module, w: float, null_label: int):
        super().__init__()
        self.model = model
        self.w = float(w)
        self.null_label = int(null_label)

    def extra_repr(self) -> str:
        return f"w={self.w}, null_label={self.null_label}"

    def forward(self, x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(1).expand(b)
        null = torch.full_like(y, self.null_label)
        if self.w == 1.0:
            return self.model(x, t, y)
        if self.w == 0.0:
            return self.model(x, t, null)
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
        eps_cond, eps_null = eps[:b], eps[b:]
        return self.w * eps_cond - (self.w - 1.0) * eps_null

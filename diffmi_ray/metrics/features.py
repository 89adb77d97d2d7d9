"""Feature extraction, once per image: the evaluation classifier E and pytorch-fid's InceptionV3.

A *feature extractor* here is any callable ``f(x) -> (B, D)`` taking images x (B, C, H, W) float in
[0, 1]. The real Inception is built from a local weights file (see :mod:`.weights`); tests inject
stand-ins under their own names through ``evaluate_reconstructions(extractors=...)``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch import Tensor, nn

FeatureFn = Callable[[Tensor], Tensor]

_INCEPTION_CACHE: dict[tuple[str, int], nn.Module] = {}
_INCEPTION_LOCK = threading.Lock()


def load_fid_inception(weights_path: str | Path, dims: int = 2048) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` (FID weights, block for ``dims``) loaded from a local file.

    pytorch-fid itself only loads through ``load_state_dict_from_url`` (hub cache or download); here
    that single call is pointed at ``weights_path`` for the duration of the constructor, so the model
    is exactly pytorch-fid's, with ``resize_input=True`` (bilinear to 299x299) and
    ``normalize_input=True`` (expects [0, 1]). The state dict is loaded strictly by pytorch-fid.
    Cached per (path, dims) on CPU.
    """
    from pytorch_fid import inception as pfi

    key = (str(Path(weights_path).resolve()), int(dims))
    with _INCEPTION_LOCK:
        if key not in _INCEPTION_CACHE:
            def _local(url, *args, **kwargs):
                return torch.load(str(weights_path), map_location="cpu", weights_only=True)

            with mock.patch.object(pfi, "load_state_dict_from_url", _local):
                model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=True,
                                        normalize_input=True, requires_grad=False, use_fid_inception=True)
            _INCEPTION_CACHE[key] = model.eval()
        return _INCEPTION_CACHE[key]


def inception_feature_fn(model: nn.Module) -> FeatureFn:
    """Wrap a pytorch-fid InceptionV3 as ``f(x in [0,1], (B,C,H,W)) -> (B, dims)``.

    Gray images (C = 1) are repeated to 3 channels, as pytorch-fid's PIL ``convert('RGB')`` does.
    """
    def f(x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out = model(x)[0]  # (B, dims, 1, 1) for pool3; spatially pooled for earlier blocks below
        if out.shape[-1] != 1 or out.shape[-2] != 1:
            out = torch.nn.functional.adaptive_avg_pool2d(out, 1)
        return out.flatten(1)
    return f


def quantize_8bit(x: Tensor) -> Tensor:
    """Round [0, 1] images to 8 bits (as writing and reading a PNG does): round(x*255)/255."""
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


@torch.no_grad()
def batched_features(fn: FeatureFn, images: Tensor, batch_size: int, device: torch.device | str) -> Tensor:
    """``fn`` over ``images`` (N, C, H, W) in batches on ``device``; returns (N, D) float32 on CPU."""
    outs = []
    for s in range(0, images.shape[0], batch_size):
        outs.append(fn(images[s:s + batch_size].to(device, torch.float32)).float().cpu())
    if not outs:
        raise ValueError("no images to extract features from")
    return torch.cat(outs)


@torch.no_grad()
def classifier_outputs(model: nn.Module, images: Tensor, batch_size: int,
                       device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(features (N, D), logits (N, K)) of E on images (N, C, H, W) in [0, 1], one pass per batch.

    Uses ``model.features_and_logits`` when the model has it (one forward pass), else
    ``model.features`` and ``model(x)``. Returned on CPU, float32.
    """
    both = getattr(model, "features_and_logits", None)
    feats, logits = [], []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(device, torch.float32)
        if both is not None:
            f, z = both(x)
        else:
            f, z = model.features(x), model(x)
        feats.append(f.float().flatten(1).cpu())
        logits.append(z.float().cpu())
    return torch.cat(feats), torch.cat(logits)

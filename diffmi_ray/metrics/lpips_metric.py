"""LPIPS-Alex / LPIPS-VGG (the ``lpips`` package, v0.1) scored pairwise with backbone features
computed once per image.

``lpips.LPIPS.forward(x0, x1)`` (v0.1, lpips=True, spatial=False, eval mode) is

    d(x0, x1) = sum_l mean_hw( lin_l( (n(f_l(s(x0))) - n(f_l(s(x1))))^2 ) )

with s the package's ScalingLayer, f_l the backbone's l-th ReLU output, n the channel-wise unit
normalisation ``lpips.normalize_tensor`` and lin_l the package's 1x1 linear heads. The backbone
(the expensive part) depends on one image only, so :func:`lpips_features` runs it once per image with
the model's own modules and :func:`lpips_from_features` applies the model's own heads to each pair.
``tests/test_metrics.py`` pins this against ``model(x0, x1)`` called directly.

Inputs: images in [0, 1] at module boundaries; converted to [-1, 1] (``conventions.to_pm1``) before
the network, as LPIPS expects. (The official Diff-MI code passes [0, 1] images unconverted.)
Gray images are repeated to 3 channels; images smaller than the backbone's minimum side (AlexNet 32,
VGG16 16) are upsampled.

Weights: the heads ship with ``lpips``; the ImageNet backbones are torchvision's files (see
:mod:`.weights`), loaded strictly from a local file into the package's backbone. With no backbone
file the metric is missing — ``pnet_rand`` (random backbone) is never used under these names.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from diffmi_ray.conventions import to_pm1
from diffmi_ray.metrics.iqa import prepare_images
from diffmi_ray.metrics.pairs import best_over_pairs

#: metric name -> (lpips ``net`` argument, minimum image side in pixels)
LPIPS_NETS: dict[str, tuple[str, int]] = {"lpips_alex": ("alex", 32), "lpips_vgg": ("vgg", 16)}
LPIPS_NAMES: tuple[str, ...] = tuple(LPIPS_NETS)

_CACHE: dict[tuple[str, str], nn.Module] = {}
_LOCK = threading.Lock()


def backbone_state_for_lpips(model: nn.Module, torchvision_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a torchvision AlexNet/VGG16 state dict (``features.<i>.<p>``) onto the lpips backbone's
    parameter names (``slice<k>.<i>.<p>``: lpips keeps torchvision's layer index ``i``)."""
    out = {}
    for name in model.net.state_dict():
        _, idx, pname = name.split(".")
        key = f"features.{idx}.{pname}"
        if key not in torchvision_state:
            raise KeyError(f"backbone weights lack {key} (needed for lpips parameter {name})")
        out[name] = torchvision_state[key]
    return out


def load_lpips(net: str, backbone_path: str | Path) -> nn.Module:
    """``lpips.LPIPS(net=net)`` with the package's linear heads and the ImageNet backbone read strictly
    from ``backbone_path`` (a torchvision state dict file). Cached per (net, path); eval mode, no grad.

    The model is constructed with ``pnet_rand=True`` only to skip lpips' own download; every backbone
    parameter is then overwritten by a strict ``load_state_dict`` from the file, so the result is the
    pretrained LPIPS (the flag is reset to False).
    """
    import lpips

    key = (net, str(Path(backbone_path).resolve()))
    with _LOCK:
        if key not in _CACHE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
            state = torch.load(str(backbone_path), map_location="cpu", weights_only=True)
            model.net.load_state_dict(backbone_state_for_lpips(model, state), strict=True)
            model.pnet_rand = False
            model.eval().requires_grad_(False)
            _CACHE[key] = model
        return _CACHE[key]


@torch.no_grad()
def lpips_features(model: nn.Module, x_pm1: Tensor) -> list[Tensor]:
    """Unit-normalised backbone activations [(B, C_l, H_l, W_l)] of images x_pm1 (B, 3, H, W) in [-1, 1]."""
    import lpips

    outs = model.net.forward(model.scaling_layer(x_pm1))
    return [lpips.normalize_tensor(outs[kk]) for kk in range(model.L)]


@torch.no_grad()
def lpips_from_features(model: nn.Module, fa: list[Tensor], fb: list[Tensor]) -> Tensor:
    """LPIPS distances (B,) between paired feature lists (as from :func:`lpips_features`)."""
    from lpips.lpips import spatial_average

    val = 0
    for kk in range(model.L):
        val = val + spatial_average(model.lins[kk]((fa[kk] - fb[kk]) ** 2), keepdim=True)
    return val.reshape(-1)


def _class_groups(labels: Tensor, private_labels: Tensor, max_images: int) -> list[Tensor]:
    """Classes of ``labels`` cut into consecutive groups of at most ``max_images`` images (recon +
    private) each; a class larger than the budget forms its own group."""
    classes, counts = torch.unique(labels, return_counts=True)
    pcounts = torch.stack([(private_labels == c).sum() for c in classes]) if len(classes) else counts
    groups, cur, size = [], [], 0
    for c, n in zip(classes.tolist(), (counts + pcounts).tolist()):
        if cur and size + n > max_images:
            groups.append(torch.tensor(cur))
            cur, size = [], 0
        cur.append(c)
        size += n
    if cur:
        groups.append(torch.tensor(cur))
    return groups


@torch.no_grad()
def pairwise_lpips(model: nn.Module, recon: Tensor, labels: Tensor, private: Tensor, private_labels: Tensor, *,
                   reduce: str, min_side: int, resize_mode: str = "bilinear", feature_batch: int = 64,
                   pair_chunk: int = 64, cache_mb: float = 1024.0, device: torch.device | str = "cpu") -> Tensor:
    """Best-match LPIPS (N,) float64 of each reconstruction over the private images of its class.

    recon (N, C, H, W), private (P, C, H, W) in [0, 1]. Classes are processed in groups whose
    backbone features fit in ``cache_mb`` MiB; within a group, features are computed once per image
    (batches of ``feature_batch``) and pairs are scored in chunks of ``pair_chunk``.
    reduce: 'min' (best: lower is better) or 'max' (official rule). NaN where a class has no private image.
    """
    from diffmi_ray.metrics.pairs import same_class_pairs

    labels = labels.long().cpu()
    private_labels = private_labels.long().cpu()
    model = model.to(device)

    def feats(x: Tensor) -> list[Tensor]:
        parts = [lpips_features(model, to_pm1(prepare_images(x[s:s + feature_batch].to(device), min_side, True,
                                                             resize_mode)))
                 for s in range(0, x.shape[0], feature_batch)]
        return [torch.cat([p[k] for p in parts]) for k in range(model.L)]

    probe = feats(recon[:1])
    bytes_per_image = sum(t[0].numel() * t.element_size() for t in probe)
    max_images = max(1, int(cache_mb * 2 ** 20 // bytes_per_image))

    out = torch.full((recon.shape[0],), float("nan"), dtype=torch.float64)
    for group in _class_groups(labels, private_labels, max_images):
        r_idx = torch.nonzero(torch.isin(labels, group)).flatten()
        p_idx = torch.nonzero(torch.isin(private_labels, group)).flatten()
        if p_idx.numel() == 0:
            continue
        fr, fp = feats(recon[r_idx]), feats(private[p_idx])
        ri, pj = same_class_pairs(labels[r_idx], private_labels[p_idx])   # local indices in the group

        def score(r: Tensor, p: Tensor) -> Tensor:
            r, p = r.to(device), p.to(device)
            return lpips_from_features(model, [f[r] for f in fr], [f[p] for f in fp])

        out[r_idx] = best_over_pairs(score, ri, pj, r_idx.numel(), reduce, pair_chunk)
    return out

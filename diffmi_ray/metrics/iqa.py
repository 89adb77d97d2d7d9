"""Full-reference image quality metrics from piq, scored pairwise in batches.

Each reconstruction is scored against every private image of its class (pairs from
:func:`.pairs.same_class_pairs`), the piq function is called on big batches of pairs with
``reduction='none'``, and the best match is kept per reconstruction (:func:`.pairs.best_over_pairs`).
Nothing here re-implements a metric: every number comes from the piq function named in the table.

Input requirements (piq 0.8, measured) and what we do about them, once per image, before pairing:

=========  ===============  =======================  ==============================================
metric     piq function     min side (px)            channels
=========  ===============  =======================  ==============================================
psnr       piq.psnr         1                        any
ssim       piq.ssim         11 (Gaussian kernel)     any
fsim       piq.fsim         1                        RGB -> FSIMc (chromatic); gray -> FSIM
vsi        piq.vsi          1 (resizes to 256 itself) RGB; gray repeated to 3 channels (as piq would)
haarpsi    piq.haarpsi      16 (2^(scales+1))        any
srsim      piq.srsim        40 (10-px Gaussian at 1/4) any (luminance; piq default chromatic=False)
dss        piq.dss          8 (DCT block)            any (luminance)
mdsi       piq.mdsi         1                        RGB; gray repeated to 3 channels (as piq would)
=========  ===============  =======================  ==============================================

Images smaller than a metric's minimum side are upsampled (``EvaluationConfig.resize_mode``) to that
side before pairing — e.g. 28x28 MNIST is scored at 40x40 by SR-SIM; such a value is not comparable
with a native-resolution one, and :func:`resize_note` says so in the result's notes. All metrics get
``data_range=1.0`` (inputs in [0, 1]) and the reconstruction as ``x``, the private image as ``y``
(the official code's argument order).

Batch independence: piq 0.8's ``srsim`` normalises the saliency map by the min/max of the WHOLE batch
(``torch.min(saliency_map[:])`` in piq/srsim.py), so a batched call changes every pair's value (by ~3%
on random 48 px images) versus the per-pair calls of the official code. SR-SIM is therefore evaluated
under ``torch.vmap`` over pairs (``IQASpec.vmap``): still one vectorised call per chunk, but each
pair is normalised on its own, which reproduces per-pair calls exactly. piq's input checks
(data-dependent asserts that vmap cannot trace) are skipped for that call only; inputs are checked and
clamped to [0, 1] before. The other seven metrics agree with per-pair calls to float32 noise (<2e-5).

Direction: higher is better for all but MDSI (a distance). With ``pairing='best'`` the kept match is
the max, or the min for MDSI; ``pairing='official'`` keeps the max for every metric (Diff-MI code).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmi_ray.metrics.pairs import best_over_pairs


@dataclass(frozen=True)
class IQASpec:
    """How to call one piq metric on batches of [0, 1] image pairs."""

    name: str
    fn_name: str                  # attribute of the piq module
    higher_is_better: bool
    min_side: int = 1
    rgb: bool = False             # needs 3 channels: gray inputs are repeated
    vmap: bool = False            # batch-dependent in piq: evaluate per pair under torch.vmap
    gray_kwargs: dict = field(default_factory=dict)
    rgb_kwargs: dict = field(default_factory=dict)

    def fn(self) -> Callable[..., Tensor]:
        """The piq function, called as ``fn(x, y, reduction='none', data_range=1.0, **kwargs) -> (B,)``."""
        import piq

        f = getattr(piq, self.fn_name)
        return _per_pair_vmap(f, self.fn_name) if self.vmap else f

    def kwargs(self, channels: int) -> dict:
        return dict(self.rgb_kwargs if channels == 3 else self.gray_kwargs)


def _per_pair_vmap(f: Callable[..., Tensor], module: str) -> Callable[..., Tensor]:
    """``f`` applied to each pair alone, vectorised with torch.vmap (piq's input checks skipped)."""
    import sys
    from unittest import mock

    piq_module = sys.modules[f"piq.{module}"]

    def g(x: Tensor, y: Tensor, **kw) -> Tensor:
        kw.pop("reduction", None)
        one = lambda a, b: f(a[None], b[None], reduction="none", **kw)[0]  # noqa: E731
        with mock.patch.object(piq_module, "_validate_input", lambda *a, **k: None):
            return torch.vmap(one)(x, y)

    return g


IQA_SPECS: dict[str, IQASpec] = {s.name: s for s in (
    IQASpec("psnr", "psnr", True),
    IQASpec("ssim", "ssim", True, min_side=11),
    IQASpec("fsim", "fsim", True, gray_kwargs={"chromatic": False}, rgb_kwargs={"chromatic": True}),
    IQASpec("vsi", "vsi", True, rgb=True),
    IQASpec("haarpsi", "haarpsi", True, min_side=16),
    IQASpec("srsim", "srsim", True, min_side=40, vmap=True),
    IQASpec("dss", "dss", True, min_side=8),
    IQASpec("mdsi", "mdsi", False, rgb=True),
)}
IQA_NAMES: tuple[str, ...] = tuple(IQA_SPECS)


def pair_reduce(higher_is_better: bool, pairing: str) -> str:
    """'max' or 'min': which match to keep. 'official' pairing keeps the max for every metric."""
    if pairing == "official":
        return "max"
    if pairing != "best":
        raise ValueError(f"unknown pairing {pairing!r}; valid: 'best', 'official'")
    return "max" if higher_is_better else "min"


def prepare_images(x: Tensor, min_side: int = 1, rgb: bool = False, resize_mode: str = "bilinear") -> Tensor:
    """Images (B, C, H, W) in [0, 1] made acceptable to a metric: gray repeated to RGB if ``rgb``,
    upsampled so that min(H, W) >= ``min_side`` (aspect kept; result clamped to [0, 1]).
    Returns ``x`` itself (no copy) when nothing needs changing."""
    if rgb and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    h, w = x.shape[-2:]
    if min(h, w) < min_side:
        s = min_side / min(h, w)
        size = (max(min_side, round(h * s)), max(min_side, round(w * s)))
        kw = {} if resize_mode == "nearest" else {"align_corners": False}
        x = F.interpolate(x, size=size, mode=resize_mode, **kw).clamp(0.0, 1.0)
    return x


def preparation_key(spec: "IQASpec", shape: tuple[int, ...]) -> tuple[bool, int]:
    """(repeat to RGB?, target min side or 0) — metrics with equal keys share prepared images."""
    c, h, w = shape[-3:]
    return (spec.rgb and c == 1, spec.min_side if min(h, w) < spec.min_side else 0)


def resize_note(spec_min_side: int, h: int, w: int) -> str | None:
    """A note when images of size (h, w) are upsampled for a metric with ``spec_min_side``."""
    if min(h, w) >= spec_min_side:
        return None
    return f"images of {h}x{w} upsampled to min side {spec_min_side} (metric minimum)"


@torch.no_grad()
def pairwise_iqa(name: str, recon: Tensor, private: Tensor, ri: Tensor, pj: Tensor, *, pairing: str = "best",
                 chunk: int = 64, device: torch.device | str = "cpu") -> Tensor:
    """Best-match score (N,) float64 of piq metric ``name`` for every reconstruction.

    recon (N, C, H, W) and private (P, C, H, W): images in [0, 1] already passed through
    :func:`prepare_images` for this metric (on the CPU; each chunk is gathered there and moved to
    ``device``); (ri, pj): same-class pairs. piq is called on chunks of ``chunk`` pairs with
    reduction='none'. NaN for reconstructions without pairs.
    """
    spec = IQA_SPECS[name]
    fn = spec.fn()
    kw = spec.kwargs(recon.shape[1])

    def score(r: Tensor, p: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return fn(recon[r].to(device), private[p].to(device), reduction="none", data_range=1.0, **kw)

    return best_over_pairs(score, ri, pj, recon.shape[0], pair_reduce(spec.higher_is_better, pairing), chunk)

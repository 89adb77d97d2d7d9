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

Per-image steps computed once (``EvaluationConfig.iqa_memo``): VSI's SDSP saliency, FSIM's phase
congruency and SR-SIM's spectral-residual saliency depend on one image only, yet piq recomputes them
for every pair. :class:`.memo.PerImageMemo` serves them from a content-keyed cache of piq's own
outputs (exact; pinned against plain per-pair piq calls by the tests). Measured on one CPU thread at
64 px with 5 reconstructions x 30 private images per class: VSI 4.3 ms/pair (per-pair piq calls:
26), FSIM 1.6 (6.7), SR-SIM 1.4 (6.3).

Batch independence: piq 0.8's ``srsim`` normalises its saliency map by the min/max of the WHOLE batch
(``torch.min(saliency_map[:])`` in piq/srsim.py), so a plain batched call changes every pair's value
(by ~3% on random 48 px images) versus the per-pair calls of the official code. Its saliency step is
therefore always computed one image at a time (through the memo, or — with ``iqa_memo=False`` — by
calling SR-SIM one pair at a time), which reproduces per-pair calls exactly. The other seven metrics
agree with per-pair calls to float32 noise (<2e-5 relative).

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

from diffmi_ray.metrics.memo import PerImageMemo, PerImageStep
from diffmi_ray.metrics.pairs import best_over_pairs


@dataclass(frozen=True)
class IQASpec:
    """How to call one piq metric on batches of [0, 1] image pairs."""

    name: str
    fn_name: str                  # attribute of the piq module
    higher_is_better: bool
    min_side: int = 1
    rgb: bool = False             # needs 3 channels: gray inputs are repeated
    per_image: PerImageStep | None = None   # piq-internal per-image step worth computing once per image
    gray_kwargs: dict = field(default_factory=dict)
    rgb_kwargs: dict = field(default_factory=dict)

    def fn(self) -> Callable[..., Tensor]:
        """The piq function, called as ``fn(x, y, reduction='none', data_range=1.0, **kwargs) -> (B,)``."""
        import piq

        return getattr(piq, self.fn_name)

    def kwargs(self, channels: int) -> dict:
        return dict(self.rgb_kwargs if channels == 3 else self.gray_kwargs)

    @property
    def batch_dependent(self) -> bool:
        """piq's batched call differs from per-pair calls unless the per-image step runs alone."""
        return self.per_image is not None and self.per_image.one_at_a_time


IQA_SPECS: dict[str, IQASpec] = {s.name: s for s in (
    IQASpec("psnr", "psnr", True),
    IQASpec("ssim", "ssim", True, min_side=11),
    IQASpec("fsim", "fsim", True, per_image=PerImageStep("piq.fsim", "_phase_congruency"),
            gray_kwargs={"chromatic": False}, rgb_kwargs={"chromatic": True}),
    IQASpec("vsi", "vsi", True, rgb=True, per_image=PerImageStep("piq.vsi", "sdsp")),
    IQASpec("haarpsi", "haarpsi", True, min_side=16),
    IQASpec("srsim", "srsim", True, min_side=40,
            per_image=PerImageStep("piq.srsim", "_spectral_residual_visual_saliency", one_at_a_time=True)),
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
                 chunk: int = 64, device: torch.device | str = "cpu", memo: bool = True,
                 memo_mb: float = 1024.0) -> Tensor:
    """Best-match score (N,) float64 of piq metric ``name`` for every reconstruction.

    recon (N, C, H, W) and private (P, C, H, W): images in [0, 1] already passed through
    :func:`prepare_images` for this metric (on the CPU; each chunk is gathered there and moved to
    ``device``); (ri, pj): same-class pairs, best ordered class by class (the memo's locality).
    piq is called on chunks of ``chunk`` pairs with reduction='none'. ``memo``: serve the metric's
    per-image step from a cache of at most ``memo_mb`` MiB (see :mod:`.memo`); without it a
    batch-dependent metric (SR-SIM) is called one pair at a time. NaN for reconstructions without pairs.
    """
    spec = IQA_SPECS[name]
    fn = spec.fn()
    kw = spec.kwargs(recon.shape[1])
    use_memo = memo and spec.per_image is not None and spec.per_image.available()
    if spec.batch_dependent and not use_memo:
        chunk = 1

    def score(r: Tensor, p: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return fn(recon[r].to(device), private[p].to(device), reduction="none", data_range=1.0, **kw)

    reduce = pair_reduce(spec.higher_is_better, pairing)
    if not use_memo:
        return best_over_pairs(score, ri, pj, recon.shape[0], reduce, chunk)
    with PerImageMemo(spec.per_image, max_bytes=memo_mb * 2 ** 20):
        return best_over_pairs(score, ri, pj, recon.shape[0], reduce, chunk)

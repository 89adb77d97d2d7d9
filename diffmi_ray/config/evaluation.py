"""Metric options of the ``evaluate`` stage (PROTOCOL.md §5): which metrics, pairing rule, weights.

Every default here is the paper's protocol; the Diff-MI code's behaviour, where it differs, is a
documented option (``pairing='official'``). The metrics themselves live in :mod:`diffmi_ray.metrics`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from diffmi_ray.config.base import StrictModel

#: Every metric group the evaluate stage knows, in report order. A group may yield several rows:
#: ``acc`` -> acc1, acc5, acc1_std, acc5_std; ``knn`` -> knn_dist, knn_count;
#: ``prdc`` -> precision, recall, density, coverage; the others one row each.
MetricGroup = Literal[
    "acc", "knn", "fid", "fid_evalnet", "prdc",
    "psnr", "ssim", "fsim", "vsi", "haarpsi", "srsim", "dss", "mdsi",
    "lpips_alex", "lpips_vgg",
]
ALL_METRICS: tuple[str, ...] = MetricGroup.__args__  # type: ignore[attr-defined]


class EvaluationConfig(StrictModel):
    """Options of the metric suite. Images are float in [0, 1]; sizes in pixels; counts are images."""

    metrics: list[MetricGroup] = Field(
        default_factory=lambda: list(ALL_METRICS),
        description="Metric groups to compute. acc: Acc1/Acc5 (+ std over the M repeats) by the evaluation "
                    "classifier E; knn: KNN Dist (+ knn_count); fid: pytorch-fid Inception FID; fid_evalnet: "
                    "Fréchet distance over E's features; prdc: precision/recall/density/coverage; psnr..mdsi: "
                    "piq IQA metrics, best match over the private images of the class; lpips_alex/lpips_vgg: "
                    "LPIPS (lpips package), best match.")
    pairing: Literal["best", "official"] = Field(
        "best",
        description="How a reconstruction is scored against the private images of its class. 'best': keep the "
                    "best match per metric direction (max for higher-is-better metrics, min for MDSI and LPIPS; "
                    "the paper's intent). 'official': max for every metric, as the official Diff-MI code does "
                    "(keeps the WORST match for MDSI and LPIPS).")
    device: str | None = Field(
        None, description="Torch device for the metrics ('cpu', 'cuda', 'cuda:1'); None = the stage's device.")

    # -- batch sizes (memory knobs; results do not depend on them) --------------------------------
    eval_batch_size: int = Field(128, ge=1, description="Images per forward pass of the evaluation classifier E.")
    feature_batch_size: int = Field(
        64, ge=1, description="Images per forward pass of Inception (FID/PRDC) and of the LPIPS backbones.")
    pair_batch_size: int = Field(
        64, ge=1,
        description="Image pairs per call of a piq metric (and per LPIPS head evaluation). Pairs of every "
                    "class are concatenated and cut into chunks of this size to bound memory.")
    pair_batch_sizes: dict[str, int] = Field(
        default_factory=lambda: {"psnr": 16, "ssim": 16, "fsim": 16, "vsi": 16, "dss": 128},
        description="Per-metric override of pair_batch_size (metric name -> pairs per call). Defaults are the "
                    "fastest chunk sizes measured on one CPU thread at 64x64 (compute-bound metrics such as "
                    "SSIM/FSIM/VSI slow down in big chunks); on a GPU raise them all.")

    feature_cache_mb: float = Field(
        1024.0, gt=0,
        description="Memory budget (MiB) of per-image caches: LPIPS backbone features (classes are processed "
                    "in groups that fit) and the per-image steps of VSI/FSIM/SR-SIM (LRU).")
    iqa_memo: bool = Field(
        True,
        description="Compute the per-image steps of VSI (SDSP saliency), FSIM (phase congruency) and SR-SIM "
                    "(spectral-residual saliency) once per image instead of once per pair, from a content-keyed "
                    "cache of piq's own outputs (exact). False calls piq plainly (SR-SIM then one pair at a "
                    "time, since piq's batched SR-SIM normalises over the whole batch).")

    # -- weights --------------------------------------------------------------------------------
    weights_dir: str | None = Field(
        None,
        description="Folder searched first for weights files (pt_inception-2015-12-05-6726825d.pth, "
                    "alexnet-owt-7be5be79.pth, vgg16-397923af.pth); None = only the torch hub cache "
                    "(<TORCH_HOME or ~/.cache/torch>/hub/checkpoints).")
    allow_download: bool = Field(
        True, description="Download missing weights into the torch hub cache before computing. A failed "
                          "download makes the metrics that need them missing (with the reason), never random.")
    verify_weights_hash: bool = Field(
        True, description="Check that a weights file's SHA-256 starts with the hash prefix in its official "
                          "file name before using it under the metric's name.")

    # -- classification and KNN -----------------------------------------------------------------
    std_ddof: Literal[0, 1] = Field(
        1, description="Delta degrees of freedom of acc1_std/acc5_std over the M repeats (1 = sample std, "
                       "as statistics.stdev in the official code; 0 with M < 2 repeats gives 0).")
    knn_features: Literal["evalnet", "inception"] = Field(
        "evalnet", description="Feature space of KNN Dist: E's penultimate features (paper) or Inception pool3.")
    knn_correct_only: bool = Field(
        True, description="Average KNN Dist over reconstructions that E classifies correctly (the paper's "
                          "fairness rule); False averages over all reconstructions.")

    # -- FID / PRDC -----------------------------------------------------------------------------
    fid_dims: Literal[64, 192, 768, 2048] = Field(
        2048, description="pytorch-fid Inception block: 2048 = pool3 (the standard FID), 64/192/768 = earlier "
                          "blocks.")
    fid_quantize: bool = Field(
        False, description="Round images to 8 bits (x*255 rounded, /255) before Inception, as pytorch-fid does "
                           "when it reads PNG files (the official code computes FID from saved PNGs).")
    prdc_k: int = Field(3, ge=1, description="k of the k-nearest-neighbour balls of precision/recall/density/coverage.")
    prdc_features: Literal["inception", "evalnet"] = Field(
        "inception", description="Feature space of PRDC: Inception pool3 (MI-toolbox convention) or E's features.")
    prdc_scope: Literal["per_class", "global"] = Field(
        "per_class",
        description="'per_class': PRDC between the reconstructions and private images of each attacked class, "
                    "averaged over classes (as the Diff-MI code and the MI toolbox report it); 'global': one "
                    "PRDC over all reconstructions vs all private images.")

    # -- IQA --------------------------------------------------------------------------------------
    resize_mode: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear", description="Interpolation used to upsample images smaller than a metric's minimum side "
                                "(SR-SIM needs 40 px, HaarPSI 16, SSIM 11, DSS 8); larger images are never resized.")

    # -- image grid ---------------------------------------------------------------------------------
    write_grid: bool = Field(True, description="Write a PNG grid of private samples and reconstructions.")
    grid_private_per_class: int = Field(
        2, ge=0, description="Private images shown per class at the top of each class column of the grid.")
    grid_max_classes: int = Field(16, ge=1, description="Classes (first ones, by label) shown in the image grid.")

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, v: list[str]) -> list[str]:
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"metric(s) listed twice: {dup}")
        return v

    @field_validator("pair_batch_sizes")
    @classmethod
    def _known_pair_metrics(cls, v: dict[str, int]) -> dict[str, int]:
        pairwise = {"psnr", "ssim", "fsim", "vsi", "haarpsi", "srsim", "dss", "mdsi", "lpips_alex", "lpips_vgg"}
        bad = sorted(set(v) - pairwise)
        if bad:
            raise ValueError(f"unknown pairwise metric(s) {bad}; valid: {sorted(pairwise)}")
        if any(int(n) < 1 for n in v.values()):
            raise ValueError("pair batch sizes must be >= 1")
        return v

    def pair_batch(self, metric: str) -> int:
        """Pairs per call for ``metric``."""
        return int(self.pair_batch_sizes.get(metric, self.pair_batch_size))

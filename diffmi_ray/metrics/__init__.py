"""The paper's evaluation metrics (PROTOCOL.md §5) as plain functions over tensors.

Entry point: :func:`evaluate_reconstructions` (options: :class:`diffmi_ray.config.evaluation.EvaluationConfig`).

Modules: ``classification`` (Acc1/Acc5, KNN Dist), ``distribution`` (Fréchet distance, PRDC),
``features`` (E and pytorch-fid Inception, once per image), ``iqa`` (piq metrics, pairwise),
``lpips_metric`` (LPIPS, pairwise), ``pairs`` (same-class pairs, best-match reduction),
``weights`` (weights files, availability), ``grid`` (image grid PNG), ``suite`` (the whole suite).
"""

from diffmi_ray.metrics.distribution import frechet_distance, prdc
from diffmi_ray.metrics.grid import grid_tensor, save_image_grid
from diffmi_ray.metrics.iqa import IQA_NAMES, IQA_SPECS
from diffmi_ray.metrics.lpips_metric import LPIPS_NAMES
from diffmi_ray.metrics.pairs import best_over_pairs, same_class_pairs
from diffmi_ray.metrics.suite import (GROUP_ROWS, LOWER_IS_BETTER, METRIC_ORDER, EvaluationResult,
                                      evaluate_reconstructions, write_csv_atomic)
from diffmi_ray.metrics.weights import available_feature_extractors

__all__ = [
    "evaluate_reconstructions", "EvaluationResult", "available_feature_extractors", "save_image_grid",
    "grid_tensor", "write_csv_atomic", "frechet_distance", "prdc", "same_class_pairs", "best_over_pairs",
    "IQA_NAMES", "IQA_SPECS", "LPIPS_NAMES", "GROUP_ROWS", "METRIC_ORDER", "LOWER_IS_BETTER",
]

"""Names, labels and metric directions shared by every part of the report.

Registry names (``diff_mi``, ``vgg16``, ``celeba`` ...) are what the runner writes; the paper's
spellings (``Diff-MI``, ``VGG16``, ``CelebA`` ...) are what ``data/paper_tables/*.csv`` use. The
functions here translate one into the other; a name without a paper spelling keeps its registry
name (e.g. ``mnist5k``, ``small_cnn``), so it can never be confused with a paper row.
"""

from __future__ import annotations

import math
from typing import Any

#: Registry method name -> the paper's method label.
METHOD_LABELS: dict[str, str] = {
    "diff_mi": "Diff-MI",
    "gmi": "GMI",
    "kedmi": "KED-MI",
    "plgmi": "PLG-MI",
    "vmi": "VMI",
    "ppa": "PPA",
}

#: Registry target-classifier name -> the paper's spelling (FaceNet64 is the paper's "Face.evoLVe").
TARGET_LABELS: dict[str, str] = {
    "vgg16": "VGG16",
    "ir152": "IR152",
    "facenet64": "FaceNet64",
    "resnet18": "ResNet-18",
}

#: Registry dataset name -> the paper's spelling.
DATASET_LABELS: dict[str, str] = {
    "celeba": "CelebA",
    "ffhq": "FFHQ",
    "facescrub": "FaceScrub",
    "cub200": "CUB-200-2011",
    "chestxray": "ChestX-Ray",
    "chexpert": "CheXpert",
}

#: Registry loss name -> the ``Lcls`` spelling of the paper's Table X settings.
LOSS_LABELS: dict[str, str] = {"topk_preg": "ours", "ce": "CE", "max_margin": "max-margin"}

#: Row order of the paper's tables; labels not listed sort after these, alphabetically.
METHOD_ORDER: tuple[str, ...] = (
    "GMI", "KED-MI", "PLG-MI", "VMI", "PPA", "Diff-MI w/o FT", "Diff-MI", "Diff-MI w/ BiDO",
)
TARGET_ORDER: tuple[str, ...] = ("VGG16", "IR152", "FaceNet64", "ResNet-18")
DATASET_ORDER: tuple[str, ...] = ("CelebA", "FFHQ", "FaceScrub", "CUB-200-2011", "ChestX-Ray", "CheXpert")
#: Row order of Table X (as printed in the paper).
ABLATION_ORDER: tuple[str, ...] = (
    "FT=1,PGD=1,Lcls=ours", "FT=1,PGD=0,Lcls=ours", "FT=1,PGD=1,Lcls=CE",
    "FT=1,PGD=1,Lcls=max-margin", "FT=0,PGD=1,Lcls=ours",
)

HIGHER_IS_BETTER = frozenset({
    "acc1", "acc5", "psnr", "ssim", "fsim", "vsi", "haarpsi", "srsim", "dss",
    "precision", "recall", "density", "coverage",
})
LOWER_IS_BETTER = frozenset({"fid", "fid_evalnet", "knn_dist", "mdsi", "lpips_alex", "lpips_vgg"})

METRIC_LABELS: dict[str, str] = {
    "acc1": "Acc1", "acc5": "Acc5", "acc1_std": "Acc1 std", "acc5_std": "Acc5 std",
    "fid": "FID", "fid_evalnet": "FID (eval net)", "knn_dist": "KNN Dist", "knn_count": "KNN count",
    "psnr": "PSNR", "ssim": "SSIM", "fsim": "FSIM", "vsi": "VSI", "haarpsi": "HaarPSI",
    "srsim": "SR-SIM", "dss": "DSS", "mdsi": "MDSI", "lpips_alex": "LPIPS-A", "lpips_vgg": "LPIPS-V",
    "precision": "Precision", "recall": "Recall", "density": "Density", "coverage": "Coverage",
}

#: Descriptor columns of results.csv that say what a grid point is (everything but ids and values).
DESCRIPTORS: tuple[str, ...] = (
    "method", "setting", "public_dataset", "private_dataset", "target_model", "eval_model", "defense",
    "finetune", "finetune_layers", "pgd", "loss", "k", "alpha", "image_size",
)
#: Hyperparameters that may tell two points of one table cell apart, with their short labels.
HYPER_LABELS: dict[str, str] = {
    "setting": "setting", "eval_model": "eval", "finetune_layers": "L", "k": "k", "alpha": "α",
    "image_size": "size", "finetune": "FT", "pgd": "PGD", "loss": "Lcls",
}


def direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if the metric has no direction."""
    if metric in HIGHER_IS_BETTER:
        return 1
    if metric in LOWER_IS_BETTER:
        return -1
    return 0


def metric_header(metric: str) -> str:
    """Column header of a metric with its direction arrow, e.g. ``Acc1 ↑``, ``FID ↓``."""
    label = METRIC_LABELS.get(metric, metric)
    d = direction(metric)
    return label if d == 0 else f"{label} {'↑' if d > 0 else '↓'}"


def is_missing(value: Any) -> bool:
    """True for None, NaN and empty strings (how results.csv spells "not applicable")."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip() in ("", "nan", "NaN", "None"):
        return True
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def as_bool(value: Any) -> bool | None:
    """Parse a results.csv boolean cell (``True``/``False``/``1``/``0``/empty) to bool or None."""
    if is_missing(value):
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "1", "yes"):
            return True
        if v in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def method_label(method: str, finetune: Any = None, defense: Any = None) -> str:
    """The paper's row label of a grid point.

    ``diff_mi`` -> ``Diff-MI``; with ``finetune`` False -> ``Diff-MI w/o FT``; under the BiDO
    defense -> ``Diff-MI w/ BiDO`` (Table VII). Baselines under a defense get `` w/ BiDO`` too
    (the paper has no such rows, so they never join a paper number).
    """
    label = METHOD_LABELS.get(method, method)
    if not is_missing(defense) and str(defense) not in ("none", ""):
        return f"{label} w/ {'BiDO' if str(defense) == 'bido' else defense}"
    if method == "diff_mi" and as_bool(finetune) is False:
        return f"{label} w/o FT"
    return label


def target_label(name: Any) -> str:
    """Paper spelling of a target classifier (registry name if the paper has none)."""
    return TARGET_LABELS.get(str(name), str(name))


def dataset_label(name: Any) -> str:
    """Paper spelling of a dataset (registry name if the paper has none)."""
    return DATASET_LABELS.get(str(name), str(name))


def ablation_label(finetune: Any, pgd: Any, loss: Any) -> str:
    """Table X setting label, e.g. ``FT=1,PGD=1,Lcls=ours``; unknown parts print as ``?``."""
    ft, pg = as_bool(finetune), as_bool(pgd)
    ft_s = "?" if ft is None else str(int(ft))
    pg_s = "?" if pg is None else str(int(pg))
    loss_s = "?" if is_missing(loss) else LOSS_LABELS.get(str(loss), str(loss))
    return f"FT={ft_s},PGD={pg_s},Lcls={loss_s}"


def order_key(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    """Sort key putting the paper's labels first, in the paper's order, then the rest by name."""
    base = value.split(" (", 1)[0]
    return (order.index(base), value) if base in order else (len(order), value)


def format_value(metric: str, value: Any) -> str:
    """A metric value as the tables print it: accuracies as percentages (``93.47%``), FID / KNN
    Dist / PSNR with 2 decimals, counts as integers, everything else with 4 decimals; ``–`` when
    missing."""
    if is_missing(value):
        return "–"
    v = float(value)
    if metric.startswith("acc"):
        return f"{100.0 * v:.2f}%"
    if metric in ("fid", "fid_evalnet", "knn_dist", "psnr"):
        return f"{v:.2f}"
    if metric == "knn_count":
        return f"{v:.0f}"
    return f"{v:.4f}"


def format_hyper(column: str, value: Any) -> str:
    """``k=20``, ``α=1``, ``L=5``, ``FT=0`` ... for row labels that tell points apart."""
    label = HYPER_LABELS.get(column, column)
    if is_missing(value):
        return f"{label}=–"
    if column in ("finetune", "pgd"):
        b = as_bool(value)
        return f"{label}={'?' if b is None else int(b)}"
    if column == "loss":
        return f"{label}={LOSS_LABELS.get(str(value), value)}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{label}={value}"

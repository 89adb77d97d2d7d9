"""Datasets (packaged offline sets and real folders) and class-disjoint splits.

``names()`` lists registered datasets; ``get_info(name)`` their facts; ``make_split`` /
``materialize`` build the deterministic private/public split as tensors in [0, 1].
"""

from diffmi_ray.data.registry import ArraySource, DatasetInfo, Source, availability_problems, get_info, names, register
from diffmi_ray.data import packaged  # noqa: F401  (registers mnist5k, uci_digits, fashion_mnist)

import importlib as _importlib

try:  # real-folder datasets (CelebA, FFHQ, FaceScrub, CUB-200-2011, ChestX-Ray, CheXpert)
    _importlib.import_module("diffmi_ray.data.folders")
except ModuleNotFoundError as _e:
    if _e.name != "diffmi_ray.data.folders":
        raise

__all__ = ["ArraySource", "DatasetInfo", "Source", "availability_problems", "get_info", "names", "register"]

"""Dataset registry: packaged offline datasets and real-folder datasets behind one interface.

A dataset is a :class:`Source`: integer labels for every item and ``image(i)`` returning the item
after the dataset's own official preprocessing (crops), as uint8 (H, W, C). Geometry
(size, channels) is applied later by :mod:`diffmi_ray.data.splits`, identically for every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class Source:
    """A loaded dataset. ``labels``: (N,) int64 class ids (-1 for unlabeled items)."""

    name: str = ""
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 (H, W, C) after the dataset's official crop."""
        raise NotImplementedError

    def images(self, idx: np.ndarray) -> list[np.ndarray]:
        return [self.image(int(i)) for i in idx]


class ArraySource(Source):
    """An in-memory dataset: ``array`` uint8 (N, H, W, C)."""

    def __init__(self, name: str, array: np.ndarray, labels: np.ndarray):
        if array.ndim != 4 or array.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 (N, H, W, C), got {array.dtype} {array.shape}")
        self.name, self.array, self.labels = name, array, labels.astype(np.int64)

    def image(self, i: int) -> np.ndarray:
        return self.array[i]

    def images(self, idx: np.ndarray) -> list[np.ndarray]:
        return list(self.array[np.asarray(idx, dtype=np.int64)])


@dataclass(frozen=True)
class DatasetInfo:
    """What validation and loading need to know about a dataset.

    num_classes: classes of the source (None: unlabeled, e.g. FFHQ; usable as public data only).
    family: datasets of one family share class ids (e.g. MNIST-5k and MNIST); a private and a public
      side of one family must not share classes.
    needs_root: a real-folder dataset that reads ``root`` (checked to exist before compute).
    check: ``check(side) -> list[(sub key, message)]`` extra availability checks (files present ...).
    """

    name: str
    num_classes: int | None
    channels: int
    native_size: int
    family: str
    needs_root: bool
    load: Callable[..., Source]
    description: str = ""
    check: Callable[..., list] | None = None
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"dataset {info.name!r} registered twice")
    _REGISTRY[info.name] = info
    return info


def _ensure_loaded() -> None:
    import diffmi_ray.data  # noqa: F401  (registers the built-in datasets)


def names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_info(name: str) -> DatasetInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; valid: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def availability_problems(side) -> list[tuple[str, str]]:
    """Problems that make ``side`` (a DataSide) unloadable, as (sub key, message); [] if fine."""
    info = get_info(side.dataset)
    probs: list[tuple[str, str]] = []
    if info.needs_root:
        import os

        if not side.root:
            probs.append(("root", f"dataset '{info.name}' reads a folder: set root to it"))
        elif "://" not in side.root and not os.path.isdir(os.path.expanduser(side.root)):
            probs.append(("root", f"dataset folder not found: {side.root}"))
    if not probs and info.check is not None:
        probs.extend(info.check(side))
    return probs

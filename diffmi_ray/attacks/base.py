"""The attack contract: every method is a small plug-in behind :class:`Attack` and the registry.

An attack gets its prepared inputs (:class:`AttackInputs`: the frozen target T, its prior's
artifact folder, optional pseudo-label artifact, device) and inverts a list of labels into images:
``invert(labels, seed) -> AttackOutput`` with images (N, C, H, W) in [0, 1].

Reproducibility: the noise of the j-th image of class c must come from
``conventions.sample_generator(seed, c, j)`` (see :func:`sample_ids`) so results do not depend on how
the labels are batched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from diffmi_ray.config.base import StrictModel


@dataclass
class AttackInputs:
    """What an attack gets prepared.

    target: the target classifier T, eval mode, parameters frozen; takes [0,1] images, returns logits.
    num_classes: classes of T. image_shape: (C, H, W) of T's inputs.
    generator_dir / generator_config: finished artifact folder (and its config.json) of the method's
      generative prior: a ``train_prior`` artifact, or Diff-MI's ``finetune_cdm`` artifact.
    pseudo_labels_dir: the ``pseudo_labels`` artifact for methods that use it (Diff-MI p-reg centroids).
    """

    target: torch.nn.Module
    num_classes: int
    image_shape: tuple[int, int, int]
    generator_dir: Path
    generator_config: dict
    pseudo_labels_dir: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[str], None] = print


@dataclass
class AttackOutput:
    """Reconstructions: images (N, C, H, W) float in [0,1]; labels (N,) long; scores (N,) optional
    target confidence of the label (softmax probability) per image; extras: method-specific info."""

    images: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        n = len(self.labels)
        if self.images.shape != (n, *image_shape):
            raise ValueError(f"attack returned images {tuple(self.images.shape)}, expected {(n, *image_shape)}")
        if not torch.isfinite(self.images).all():
            raise ValueError("attack returned non-finite pixels")
        if self.images.min() < 0 or self.images.max() > 1:
            raise ValueError("attack returned pixels outside [0, 1]")


class Attack(ABC):
    """Base class of every attack. Subclasses set ``name`` and ``config_cls`` and implement ``invert``.

    ``__init__`` loads what the attack needs from ``inputs`` (its prior); ``invert`` does the work.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[StrictModel]]

    def __init__(self, config: StrictModel | dict, inputs: AttackInputs):
        self.config = config if isinstance(config, StrictModel) else self.config_cls.model_validate(config)
        self.inputs = inputs
        self.device = inputs.device

    @abstractmethod
    def invert(self, labels: torch.Tensor, seed: int) -> AttackOutput:
        """Reconstruct one image per entry of ``labels`` (N,) long; deterministic given ``seed``."""

    # ------------------------------------------------------------- helpers for subclasses
    @torch.no_grad()
    def target_scores(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Softmax probability of each label under T: (N,) in [0,1]."""
        logits = self.inputs.target(images.to(self.device))
        return logits.softmax(-1).gather(1, labels.to(self.device).view(-1, 1)).squeeze(1).cpu()


def sample_ids(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(class, repeat index) of each label: the j-th occurrence of class c gets (c, j)."""
    seen: dict[int, int] = {}
    out = []
    for c in labels.tolist():
        j = seen.get(c, 0)
        seen[c] = j + 1
        out.append((int(c), j))
    return out


def batches(n: int, batch_size: int):
    """Slices covering range(n) in chunks of batch_size."""
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


_REGISTRY: dict[str, type[Attack]] = {}
ATTACK_NAMES = ("diff_mi", "gmi", "kedmi", "plgmi", "vmi", "ppa")


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"attack {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import importlib

    for name in ATTACK_NAMES:
        if name not in _REGISTRY:
            try:
                importlib.import_module(f"diffmi_ray.attacks.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"diffmi_ray.attacks.{name}":
                    raise


def get_attack(name: str) -> type[Attack]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown attack {name!r}; valid: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)

"""Model registry: ``create(name, num_classes, **kw)`` and the facts validation needs.

Each model module registers its constructors with :func:`register`. Metadata lets the config layer
reject an image size or channel count a model cannot take before any compute starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

KINDS = ("classifier", "unet", "generator", "discriminator", "autoencoder")


@dataclass(frozen=True)
class ModelInfo:
    """What the config layer needs to know about a registered model.

    image_sizes: input sizes (pixels, square) the model takes; None means any size >= min_size.
    channels: input channel counts it takes; None means any.
    """

    name: str
    kind: str
    factory: Callable[..., torch.nn.Module]
    image_sizes: tuple[int, ...] | None = None
    min_size: int = 1
    channels: tuple[int, ...] | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    def size_error(self, size: int, channels: int) -> str | None:
        """A message if this model cannot take (channels, size, size) inputs, else None."""
        if self.image_sizes is not None and size not in self.image_sizes:
            return f"model '{self.name}' takes image sizes {list(self.image_sizes)}, got {size}"
        if size < self.min_size:
            return f"model '{self.name}' needs image size >= {self.min_size}, got {size}"
        if self.channels is not None and channels not in self.channels:
            return f"model '{self.name}' takes {list(self.channels)} input channel(s), got {channels}"
        return None


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, *, kind: str, image_sizes: tuple[int, ...] | None = None, min_size: int = 1,
             channels: tuple[int, ...] | None = None, description: str = "", **extra):
    """Decorator registering ``factory(num_classes, **kw) -> nn.Module`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {KINDS}")

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, kind, factory, image_sizes, min_size, channels, description, extra)
        return factory

    return deco


def _ensure_loaded() -> None:
    # Importing the package registers every built-in model.
    import diffmi_ray.models  # noqa: F401


def get_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; valid: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names(kind: str | None = None) -> list[str]:
    _ensure_loaded()
    return sorted(n for n, i in _REGISTRY.items() if kind is None or i.kind == kind)


def create(name: str, num_classes: int, **kw) -> torch.nn.Module:
    """Build the registered model ``name`` for ``num_classes`` classes (kw: its own options)."""
    return get_info(name).factory(num_classes, **kw)

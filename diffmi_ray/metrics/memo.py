"""Exact per-image memoisation of a piq-internal step, so pairwise scoring computes it once per image.

A piq metric f(x, y) on a batch of pairs runs some per-image step on x and on y (VSI: the SDSP
saliency map; FSIM: phase congruency; SR-SIM: the spectral-residual saliency map) and then combines
them per pair. When every reconstruction meets 30 private images, that step runs 30x per
reconstruction. :class:`PerImageMemo` wraps the step *as piq calls it* (the module attribute is
patched for the duration of a ``with`` block): each image of the batch is identified by a hash of its
exact content (and of the step's other arguments), computed once by piq's own function, cached, and
the cached rows are returned stacked. No formula is re-typed; the numbers are piq's.

Conditions (checked by tests against plain per-pair piq calls): the step must act on each image
independently, or be called one image at a time (``one_at_a_time``; SR-SIM's normalises over the
whole batch, so it is). Memory is bounded by an LRU budget; pairs are scored class by class so a
class's images stay cached while they are needed.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import OrderedDict
from dataclasses import dataclass
from unittest import mock

import torch
from torch import Tensor


@dataclass(frozen=True)
class PerImageStep:
    """A per-image function inside a piq module: ``module.attr(x (B, ...), *args, **kw) -> (B, ...)``."""

    module: str
    attr: str
    one_at_a_time: bool = False   # piq's function is batch-dependent: call it on one image at a time

    def available(self) -> bool:
        try:
            return callable(getattr(importlib.import_module(self.module), self.attr, None))
        except ImportError:
            return False


def _digest(t: Tensor) -> bytes:
    t = t.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.cpu().contiguous().numpy().tobytes())
    return h.digest()


class PerImageMemo:
    """Context manager: while active, ``step`` is served from a content-keyed per-image cache.

    max_bytes bounds the cached outputs (least recently used rows are dropped first).
    ``hits`` / ``misses`` count images served from the cache (or from a duplicate in the same batch) /
    computed.
    """

    def __init__(self, step: PerImageStep, max_bytes: float = 1 << 30):
        self.step = step
        self.max_bytes = float(max_bytes)
        self.module = importlib.import_module(step.module)
        self.orig = getattr(self.module, step.attr)
        self.cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._patch = None

    def _args_key(self, args: tuple, kwargs: dict) -> tuple:
        parts = [_digest(a) if torch.is_tensor(a) else repr(a) for a in args]
        parts += [(k, _digest(v) if torch.is_tensor(v) else repr(v)) for k, v in sorted(kwargs.items())]
        return tuple(parts)

    def _store(self, key: tuple, value: Tensor) -> None:
        self.cache[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        extra = self._args_key(args, kwargs)
        host = x.detach().cpu()
        keys = [(extra, _digest(host[i])) for i in range(x.shape[0])]
        found: dict[tuple, Tensor] = {}
        missing: dict[tuple, int] = {}          # key -> first row holding it (duplicates computed once)
        for i, k in enumerate(keys):
            if k in found or k in missing:
                continue
            if k in self.cache:
                self.cache.move_to_end(k)
                found[k] = self.cache[k]
            else:
                missing[k] = i
        self.misses += len(missing)
        self.hits += x.shape[0] - len(missing)
        if missing:
            idx = list(missing.values())
            if self.step.one_at_a_time:
                outs = [self.orig(x[i:i + 1], *args, **kwargs)[0] for i in idx]
            else:
                outs = list(self.orig(x[idx], *args, **kwargs))
            for k, o in zip(missing, outs):
                found[k] = o
                self._store(k, o)
        return torch.stack([found[k] for k in keys])

    def __enter__(self) -> "PerImageMemo":
        self._patch = mock.patch.object(self.module, self.step.attr, self)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)
        self.cache.clear()
        self.bytes = 0

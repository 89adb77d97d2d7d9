"""Stage `pseudo_labels`: top-n selection of public images per target class and p-reg centroids.

Diff-MI step 1a (paper §III-B.1, PROTOCOL.md §3) and PLG-MI: feed the whole public set to the target
T; for every class y keep the n public images with the highest T score for y. The score is the logit
l_y (paper, default) or the softmax probability (official code, ``score: softmax``); an image may be
selected for several classes. The p-reg centroid of class y (paper eq. 8) is the mean penultimate
feature ``T.features(x)`` over the images selected for y.

Config (:mod:`diffmi_ray.pipeline.plan`): ``{"pseudo_labels": PseudoLabelConfig dump, "seed"}``;
parents ``split`` and ``target``.

Artifact ``pseudo_labels.pt`` (a dict of tensors and numbers, ``weights_only`` loadable):

====================  ===========  =====================================================================
key                   shape        meaning
====================  ===========  =====================================================================
``indices``           (C, n) long  per class, the positions (into the split's public list) of its top-n
                                   images, best first (ties: lower position first)
``scores``            (C, n)       their scores for that class
``centroids``         (C, D)       mean ``T.features`` of each class's selected images
``top1``              (m,) long    top-1 pseudo-label (argmax logit) of every public image
``top1_score``        (m,)         its score (logit or softmax probability, as configured)
``score``             str          "logit" or "softmax"
``top_n``             int          n actually used (min(top_n, m))
``num_classes``       int          C
``num_public``        int          m
====================  ===========  =====================================================================

:func:`load_pseudo_labels` reads it back; :func:`training_pairs` turns it into (public position,
label) pairs for conditional training (Diff-MI's CDM pretraining, PLG-MI's GAN).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffmi_ray.config.methods import PseudoLabelConfig

__all__ = ["FILE", "score_public", "select_top_n", "class_centroids", "compute_pseudo_labels", "run",
           "load_pseudo_labels", "training_pairs"]

FILE = "pseudo_labels.pt"


@torch.no_grad()
def score_public(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (m, C), features (m, D)) of T on images x (m, C_in, H, W) in [0, 1], on the CPU.

    ``x`` is a tensor or anything with ``len`` and slicing to tensors (:class:`~diffmi_ray.data.splits.LazyImages`).

    ``model`` must follow the classifier contract (forward -> logits, ``features`` -> penultimate
    features); ``features_and_logits`` is used when present (one pass).
    """
    logits, feats = [], []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(device)
        if hasattr(model, "features_and_logits"):
            f, lg = model.features_and_logits(xb)
        else:
            f = model.features(xb)
            lg = model(xb)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(logits), torch.cat(feats)


def select_top_n(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class (column of ``scores`` (m, C)), the positions of the n highest rows, best first.

    Returns (indices (C, n) long, their scores (C, n)). Sorting is stable, so among equal scores the
    lower position comes first. n is capped at m.
    """
    n = min(int(n), scores.shape[0])
    order = torch.sort(scores.t(), dim=1, descending=True, stable=True).indices[:, :n]  # (C, n)
    return order, torch.gather(scores.t(), 1, order)


def class_centroids(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean feature of each class's selected rows: features (m, D), indices (C, n) -> (C, D)."""
    return features[indices].mean(dim=1)


def compute_pseudo_labels(model: torch.nn.Module, public_x, cfg: PseudoLabelConfig,
                          device: torch.device | str = "cpu") -> dict:
    """The artifact dict (see the module docstring) for target ``model`` and public images (m, C, H, W)
    (a tensor or a :class:`~diffmi_ray.data.splits.LazyImages`)."""
    if len(public_x) == 0:
        raise ValueError("the public set is empty: nothing to pseudo-label")
    logits, feats = score_public(model, public_x, cfg.batch_size, device)
    scores = logits if cfg.score == "logit" else logits.softmax(dim=1)
    indices, top_scores = select_top_n(scores, cfg.top_n)
    top1_score, top1 = scores.max(dim=1)
    return {
        "indices": indices, "scores": top_scores, "centroids": class_centroids(feats, indices),
        "top1": top1, "top1_score": top1_score, "score": cfg.score, "top_n": int(indices.shape[1]),
        "num_classes": int(scores.shape[1]), "num_public": int(scores.shape[0]),
    }


def run(ctx) -> dict:
    """Score the split's public images with the target and write ``pseudo_labels.pt``."""
    from diffmi_ray.data.splits import public_images
    from diffmi_ray.pipeline.stages.split import data_config_of, load as load_split
    from diffmi_ray.pipeline.stages.train_classifier import load_classifier

    cfg = PseudoLabelConfig.model_validate(ctx.config.get("pseudo_labels", {}))
    split_parent = ctx.parent("split")
    data = data_config_of(split_parent)
    split = load_split(split_parent.path)
    public_x = public_images(split, data)  # loaded batch by batch while scoring
    target = load_classifier(ctx.parent("target").path, ctx.device)
    if cfg.top_n > len(public_x):
        ctx.log(f"top_n={cfg.top_n} exceeds the {len(public_x)} public images; using n={len(public_x)}")
    out = compute_pseudo_labels(target, public_x, cfg, ctx.device)
    if out["num_classes"] != split.num_classes:
        raise ValueError(f"target has {out['num_classes']} classes, the split {split.num_classes}")
    torch.save(out, ctx.out_dir / FILE)
    counts = torch.bincount(out["top1"], minlength=out["num_classes"])
    ctx.log(f"top-{out['top_n']} of {out['num_public']} public images for {out['num_classes']} classes "
            f"by {cfg.score}; {int(out['indices'].unique().numel())} distinct images selected")
    return {"top_n": out["top_n"], "num_public": out["num_public"],
            "distinct_selected": int(out["indices"].unique().numel()),
            "mean_selected_score": float(out["scores"].mean()),
            "top1_counts": counts.tolist()}


def load_pseudo_labels(path: str | Path) -> dict:
    """The artifact dict of a finished `pseudo_labels` stage (its folder, or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILE
    if not p.is_file():
        raise FileNotFoundError(f"no pseudo-label file at {p}")
    return torch.load(p, map_location="cpu", weights_only=True)


def training_pairs(pl: dict, use_all_public: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(public positions (N,), labels (N,)) for conditional training on pseudo-labelled public data.

    Default: the top-n selection, every selected image with its class (an image selected for two
    classes appears twice), N = C * n. ``use_all_public``: every public image with its top-1
    pseudo-label, N = m.
    """
    if use_all_public:
        return torch.arange(int(pl["num_public"])), pl["top1"].clone()
    idx = pl["indices"]  # (C, n)
    labels = torch.arange(idx.shape[0]).repeat_interleave(idx.shape[1])
    return idx.reshape(-1).clone(), labels

"""Attack accuracy (Acc1/Acc5 with std over repeats) and KNN Dist, from E's logits and features.

Repeat index: the M reconstructions of a class are told apart by their order — the r-th image of
class c in ``labels`` (0-based, in the order given) has repeat index r. The official code's
``calc_acc_std`` computes one accuracy per repeat (over all classes) and reports the mean and the
sample standard deviation (``statistics.stdev``) of those M accuracies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffmi_ray.metrics.pairs import best_over_pairs, same_class_pairs


def repeat_index(labels: Tensor) -> Tensor:
    """(N,) long: how many earlier entries of ``labels`` (N,) have the same label."""
    labels = labels.long().cpu()
    n = labels.numel()
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    out = torch.empty(n, dtype=torch.long)
    out[order] = torch.arange(n) - starts
    return out


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """(N,) bool: label among the top-k logits (k clipped to the number of classes)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.view(-1, 1).to(logits.device)).any(dim=1).cpu()


def _std(values: Tensor, ddof: int) -> float:
    """Standard deviation with ``ddof``; 0.0 when fewer than ddof + 1 values (the official fallback)."""
    if values.numel() <= ddof:
        return 0.0
    return float(values.double().std(correction=ddof))


def accuracy_metrics(logits: Tensor, labels: Tensor, ddof: int = 1) -> tuple[dict, dict]:
    """Acc1/Acc5 as fractions in [0, 1], per class and overall.

    logits (N, K) of E on the reconstructions; labels (N,) target classes.
    Returns (per_class, aggregate):
      per_class: {class: {acc1, acc5, acc1_std, acc5_std}} — mean and std over the class's M images
        (one per repeat, so the std is over repeats);
      aggregate: {acc1, acc5, acc1_std, acc5_std} — acc over all images; std over the per-repeat
        accuracies (repeat r's accuracy = mean over the r-th image of every class), as the official code.
    """
    labels = labels.long().cpu()
    c1 = topk_correct(logits, labels, 1).double()
    c5 = topk_correct(logits, labels, 5).double()
    rep = repeat_index(labels)
    per_class = {}
    for c in torch.unique(labels).tolist():
        m = labels == c
        per_class[int(c)] = {"acc1": float(c1[m].mean()), "acc5": float(c5[m].mean()),
                             "acc1_std": _std(c1[m], ddof), "acc5_std": _std(c5[m], ddof)}
    reps = torch.unique(rep)
    r1 = torch.stack([c1[rep == r].mean() for r in reps])
    r5 = torch.stack([c5[rep == r].mean() for r in reps])
    aggregate = {"acc1": float(c1.mean()), "acc5": float(c5.mean()),
                 "acc1_std": _std(r1, ddof), "acc5_std": _std(r5, ddof)}
    return per_class, aggregate


def nearest_private_sqdist(feats: Tensor, labels: Tensor, private_feats: Tensor, private_labels: Tensor,
                           chunk: int = 4096) -> Tensor:
    """(N,) float64: squared L2 from each reconstruction's features (N, D) to the nearest private
    features (P, D) of the same class; NaN where the class has no private image."""
    ri, pj = same_class_pairs(labels, private_labels)
    f = feats.double()
    g = private_feats.double()
    return best_over_pairs(lambda r, p: ((f[r] - g[p]) ** 2).sum(dim=1), ri, pj, feats.shape[0], "min", chunk)


def knn_metrics(sqdist: Tensor, labels: Tensor, correct: Tensor | None) -> tuple[dict, dict]:
    """KNN Dist per class and overall from per-reconstruction nearest squared distances (N,).

    correct (N,) bool selects the reconstructions E classifies correctly (paper's fairness rule);
    None uses all. knn_dist is the mean over the selected reconstructions (NaN if none);
    knn_count their number. Reconstructions without a private image of their class (NaN) are skipped.
    """
    labels = labels.long().cpu()
    sel = ~torch.isnan(sqdist)
    if correct is not None:
        sel &= correct.cpu().bool()

    def stats(mask: Tensor) -> dict:
        n = int(mask.sum())
        return {"knn_dist": float(sqdist[mask].mean()) if n else float("nan"), "knn_count": float(n)}

    per_class = {int(c): stats(sel & (labels == c)) for c in torch.unique(labels).tolist()}
    return per_class, stats(sel)

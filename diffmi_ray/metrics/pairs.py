"""Reconstruction x private-image pairs of the same class, and the best-match reduction over them.

Every pairwise metric (KNN Dist, piq IQA metrics, LPIPS) scores each reconstruction against EVERY
private image of its class and keeps one value per reconstruction. Pairs are built once as two index
vectors and scored in chunks, never in a Python loop over pairs.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

Reduce = Literal["max", "min"]


def same_class_pairs(labels: Tensor, private_labels: Tensor) -> tuple[Tensor, Tensor]:
    """All (reconstruction, private image) index pairs with equal labels.

    labels (N,), private_labels (P,) integer. Returns (ri, pj), each (n_pairs,) long, ordered by
    reconstruction index and, within one reconstruction, by private index. A reconstruction whose
    class has no private image has no pair.
    """
    labels = labels.long().cpu()
    private_labels = private_labels.long().cpu()
    order = torch.argsort(private_labels, stable=True)
    sorted_pl = private_labels[order]
    start = torch.searchsorted(sorted_pl, labels, right=False)
    end = torch.searchsorted(sorted_pl, labels, right=True)
    counts = end - start                                               # (N,) private images per recon
    ri = torch.repeat_interleave(torch.arange(labels.numel()), counts)
    offsets = torch.arange(ri.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    pj = order[torch.repeat_interleave(start, counts) + offsets]
    return ri, pj


def best_over_pairs(score: Callable[[Tensor, Tensor], Tensor], ri: Tensor, pj: Tensor, n: int,
                    reduce: Reduce, chunk: int) -> Tensor:
    """Per-reconstruction best score over its pairs.

    score(ri_chunk, pj_chunk) -> (len(chunk),) scores of those pairs (the callable gathers the images
    or features it needs). Pairs are scored in chunks of ``chunk``; the result (n,) float64 holds the
    max (reduce='max') or min ('min') per reconstruction, NaN where a reconstruction has no pair.
    """
    fill = float("-inf") if reduce == "max" else float("inf")
    best = torch.full((n,), fill, dtype=torch.float64)
    op = "amax" if reduce == "max" else "amin"
    for s in range(0, ri.numel(), chunk):
        r = ri[s:s + chunk]
        v = score(r, pj[s:s + chunk]).detach().double().cpu().reshape(-1)
        best.scatter_reduce_(0, r, v, reduce=op, include_self=True)
    has_pair = torch.zeros(n, dtype=torch.bool)
    has_pair[ri] = True
    best[~has_pair] = float("nan")
    return best

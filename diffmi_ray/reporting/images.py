"""Image grids like the paper's Fig. 3-5: private images in the first row, one row per method.

One grid per context (setting, public, private, target classifier). Columns are the same classes
in every row: the first ``n_classes`` classes that have a private image, in class order (if no
point saved private images, the classes the attacks reconstructed). Each cell shows the first
image of that class; a point without one leaves the cell blank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from diffmi_ray.reporting.names import METHOD_ORDER, order_key
from diffmi_ray.reporting.plots import save
from diffmi_ray.reporting.results import Results
from diffmi_ray.reporting.tables import disambiguate

CONTEXT_KEY = ("setting", "public", "private", "target")


@dataclass
class ImageGrid:
    """One written grid: its context, classes shown, row labels and files (PNG, PDF)."""

    context: dict
    classes: list[int]
    rows: list[str]
    files: list[Path]

    @property
    def title(self) -> str:
        c = self.context
        return f"{c['setting']}: {c['public']} → {c['private']}, T = {c['target']}"


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(str(p) for p in parts)).strip("-").lower()


def _first_of_class(images: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray | None:
    hits = np.flatnonzero(labels.astype(int) == cls)
    return images[hits[0]] if len(hits) else None


def _to_rgb(img: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, C) with C in {1, 3} -> uint8 (H, W, 3); None -> a white cell."""
    if img is None:
        return np.full((*size, 3), 255, dtype=np.uint8)
    img = np.asarray(img, dtype=np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[:2] != tuple(size):  # nearest-neighbour resize to the grid's cell size
        ys = np.linspace(0, img.shape[0] - 1, size[0]).round().astype(int)
        xs = np.linspace(0, img.shape[1] - 1, size[1]).round().astype(int)
        img = img[ys][:, xs]
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]


def mosaic(cells: list[list[np.ndarray | None]], pad: int = 2) -> np.ndarray:
    """Tile a rows x cols list of uint8 images (None = blank) into one uint8 (H, W, 3) array with
    ``pad`` white pixels between cells; cells take the size of the first image (others are resized)."""
    shape = next(c.shape[:2] for row in cells for c in row if c is not None)
    h, w = shape
    n_rows, n_cols = len(cells), len(cells[0])
    out = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = _to_rgb(img, shape)
    return out


def image_grids(results: Results, labelled: pd.DataFrame, out_dir: Path, n_classes: int = 8) -> list[ImageGrid]:
    """Write one grid per context that has samples; returns what was written."""
    grids = []
    for ctx, pts in labelled.groupby(list(CONTEXT_KEY), sort=True):
        pts = pts.copy()
        pts["row"] = disambiguate(pts.assign(row=pts["method_label"]), ["row"])
        samples = {p: results.samples(p) for p in pts["point"]}
        samples = {p: s for p, s in samples.items() if s is not None and "recon" in s}
        if not samples:
            continue
        private = next((s for s in samples.values() if len(s.get("private", []))), None)
        if private is not None:
            classes = sorted({int(c) for c in private["private_labels"]})
        else:
            classes = sorted({int(c) for s in samples.values() for c in s["recon_labels"]})
        classes = classes[:n_classes]
        rows = sorted((r for r in pts.itertuples() if r.point in samples),
                      key=lambda r: (order_key(r.row, METHOD_ORDER), r.point))

        cells = [[_first_of_class(private["private"], private["private_labels"], c) if private is not None else None
                  for c in classes]]
        cells += [[_first_of_class(samples[r.point]["recon"], samples[r.point]["recon_labels"], c) for c in classes]
                  for r in rows]
        img = mosaic(cells)
        h, w = next(c.shape[:2] for row in cells for c in row if c is not None)
        pad = 2
        scale = 0.9 / max(h, w)  # inches per image pixel: one cell is about 0.9 inch wide
        fig = Figure(figsize=(img.shape[1] * scale + 1.8, img.shape[0] * scale + 0.7))
        ax = fig.add_subplot()
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(classes))])
        ax.set_xticklabels([f"class {c}" for c in classes], fontsize=7)
        ax.xaxis.tick_top()
        ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows) + 1)])
        ax.set_yticklabels(["private"] + [r.row for r in rows], fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        context = dict(zip(CONTEXT_KEY, ctx))
        ax.set_title(f"{context['setting']}: {context['public']} → {context['private']}, T = {context['target']}",
                     fontsize=9, pad=16)
        files = save(fig, out_dir / f"images_{_slug(*ctx)}")
        grids.append(ImageGrid(context, classes, [r.row for r in rows], files))
    return grids

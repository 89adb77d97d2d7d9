"""Figures of the report (matplotlib, object-oriented API on the Agg canvas: no display needed).

* Fig. 6a: change rate per middle-block layer of the fine-tuned CDM (selected layers starred);
* Fig. 6b / 6c / 6d: Acc1 (left axis) and FID (right axis) against the number of fine-tuned layers
  L, the top-k of the loss, and the p-reg weight alpha, for every Diff-MI sweep in the results;
* accuracy-fidelity scatter (Acc1 vs FID) of every grid point, with the paper's point for the same
  (setting, datasets, target, method) overlaid, and the paper's points of the same settings in a
  separate "paper reference" panel when they do not match ours.

Each function writes ``<stem>.png`` and ``<stem>.pdf`` and returns the two paths, or returns None
when the results hold nothing to draw (the caller records why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from diffmi_ray.reporting.names import DESCRIPTORS, METHOD_ORDER, format_hyper, order_key
from diffmi_ray.reporting.paper import paper_tables
from diffmi_ray.reporting.results import Results

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
SWEEPS: dict[str, tuple[str, str, str]] = {
    # x column -> (figure stem, x-axis label, title)
    "finetune_layers": ("fig6b_finetune_layers", "number of fine-tuned layers L (top-L by change rate)",
                        "Fig. 6b: Acc and FID vs fine-tuned layers"),
    "k": ("fig6c_k", "k (top-k of the classification loss)", "Fig. 6c: Acc and FID vs k"),
    "alpha": ("fig6d_alpha", "α (p-reg weight)", "Fig. 6d: Acc and FID vs α"),
}


def method_color(label: str) -> str:
    """A fixed colour per method label (same in every figure)."""
    base = label.split(" (", 1)[0]
    i = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER) + sum(map(ord, base)) % 2
    return _PALETTE[i % len(_PALETTE)]


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.pdf``; returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    return paths


def _context_label(rows: pd.DataFrame, cols: list[str]) -> list[str]:
    """Short labels naming only the columns in ``cols`` that differ between ``rows``."""
    varying = [c for c in cols if rows[c].astype(str).nunique() > 1]
    if not varying:
        return [""] * len(rows)
    return [", ".join(format_hyper(c, r[c]) if c in ("k", "alpha", "finetune_layers", "finetune", "pgd", "loss",
                                                      "image_size", "eval_model")
                      else str(r[c]) for c in varying) for _, r in rows.iterrows()]


# -------------------------------------------------------------------------------------- Fig. 6a


def selected_mask(layers: list[int], selected: list[int]) -> list[bool]:
    """Which entries of ``layers`` were fine-tuned: ``selected`` holds layer numbers (1-based, the
    values of ``layers``, as :func:`diffmi_ray.training.finetune.select_layers` returns them)."""
    chosen = {int(s) for s in selected}
    return [int(layer) in chosen for layer in layers]


def plot_change_rates(results: Results, labelled: pd.DataFrame, stem: Path) -> list[Path] | None:
    """Fig. 6a: grouped bars of the change rate per layer, one bar series per distinct fine-tuned
    CDM (identical change-rate files of several points are drawn once); selected layers starred.
    Where points share one probe's change rates but fine-tuned different layer sets (the Fig. 6b
    sweep over L), the bars carry their top-L rank instead (1 = the layer L = 1 trains; layer r is
    trained for every L >= r), since no single set of stars is right.

    change_rates.json: ``layers`` (1..13), ``change_rate`` (one float per layer) and ``selected``
    (the fine-tuned layers' numbers, 1-based like ``layers``)."""
    series = []
    selections: dict[tuple, set] = {}
    for _, r in labelled[labelled["method"] == "diff_mi"].sort_values("point").iterrows():
        cr = results.change_rates(r["point"])
        if not cr or cr.get("change_rate") is None:
            continue  # no probe ran (an explicit layer list): nothing to draw
        layers = [int(v) for v in cr["layers"]]
        rates = [float(v) for v in cr["change_rate"]]
        key = (r["public"], r["private"], r["target"], tuple(np.round(rates, 10)))
        selected = tuple(int(i) for i in cr.get("selected", []))
        if key not in selections:
            series.append((r, layers, rates, list(selected), key))
        selections.setdefault(key, set()).add(selected)
    if not series:
        return None
    labels = [f"{r['public']} → {r['private']} · {r['target']}" for r, *_ in series]
    labels = [f"{lab} ({r['setting']}, {r['point']})" if labels.count(lab) > 1 else lab
              for lab, (r, *_) in zip(labels, series)]

    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    n = len(series)
    width = 0.8 / n
    ranked = False
    for i, ((_, layers, rates, selected, key), label) in enumerate(zip(series, labels)):
        x = np.asarray(layers, dtype=float) + (i - (n - 1) / 2) * width
        color = _PALETTE[i % len(_PALETTE)]
        ax.bar(x, rates, width=width, color=color, label=label)
        if len(selections[key]) > 1:  # one probe, several L: show the top-L order
            ranked = True
            order = sorted(range(len(rates)), key=lambda j: (-rates[j], j))  # select_layers' tie rule
            for rank, j in enumerate(order, start=1):
                ax.text(x[j], rates[j] * 1.02 + 1e-12, str(rank), ha="center", va="bottom", fontsize=7)
            continue
        sel = np.flatnonzero(selected_mask(layers, selected))
        if len(sel):
            ax.scatter(x[sel], np.asarray(rates)[sel] * 1.04 + 1e-12, marker="*", s=60, color=color,
                       edgecolor="black", linewidths=0.5, zorder=3)
    all_layers = sorted({l for s in series for l in s[1]})
    ax.set_xticks(all_layers)
    ax.set_ylim(0.0, 1.12 * max(max(s[2]) for s in series) + 1e-12)  # room for the stars / ranks
    ax.set_xlabel("layer of the middle block")
    ax.set_ylabel("change rate Δ = ‖θ′ − θ‖ / ‖θ‖")
    ax.set_title("Fig. 6a: change rate per layer ("
                 + ("numbers = top-L rank" if ranked else "★ = fine-tuned layers") + ")")
    ax.legend(fontsize=8)
    return save(fig, stem)


# ---------------------------------------------------------------------------------- Fig. 6b-d


def sweeps(labelled: pd.DataFrame, x: str) -> list[pd.DataFrame]:
    """Diff-MI sweeps over ``x``: groups of points (no defense; fine-tuned for ``finetune_layers``)
    identical in every descriptor but ``x``, with at least two distinct values of ``x``. Each frame
    is sorted by ``x`` and has columns point, x, acc1, fid and the descriptors."""
    d = labelled[(labelled["method"] == "diff_mi") & (labelled["defense"] == "none")]
    if x == "finetune_layers":
        d = d[d["finetune"].map(lambda v: v is True).astype(bool)]
    d = d[d[x].notna()]
    keys = [c for c in DESCRIPTORS if c != x]
    out = []
    for _, g in d.groupby([d[c].astype(str) for c in keys], sort=True):
        if g[x].nunique() >= 2 and g[["acc1", "fid"]].notna().any().any():
            out.append(g.sort_values(x).reset_index(drop=True))
    return out


def plot_sweep(labelled: pd.DataFrame, x: str, stem: Path) -> list[Path] | None:
    """Fig. 6b/c/d: Acc1 (%, left axis, solid) and FID (right axis, dashed) against ``x``."""
    groups = sweeps(labelled, x)
    if not groups:
        return None
    _, xlabel, title = SWEEPS[x]
    heads = pd.DataFrame([g.iloc[0] for g in groups])
    labels = _context_label(heads, ["setting", "public", "private", "target", *[c for c in
                                    ("k", "alpha", "finetune_layers", "pgd", "loss", "eval_model") if c != x]])
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.subplots()
    ax2 = ax.twinx()
    for i, (g, label) in enumerate(zip(groups, labels)):
        color = _PALETTE[i % len(_PALETTE)]
        suffix = f" ({label})" if label else ""
        if g["acc1"].notna().any():
            ax.plot(g[x], 100.0 * g["acc1"], "-o", color=color, label=f"Acc1{suffix}")
        if g["fid"].notna().any():
            ax2.plot(g[x], g["fid"], "--s", color=color, alpha=0.8, label=f"FID{suffix}")
    xs = sorted({float(v) for g in groups for v in g[x]})
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{v:g}" for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Acc1 (%) ↑")
    if any(g["fid"].notna().any() for g in groups):
        ax2.set_ylabel("FID ↓")
    else:  # no FID (e.g. offline, no Inception weights): no empty right axis pretending a scale
        ax2.set_axis_off()
        title = f"{title} (FID not computed)"
    ax.set_title(title)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    return save(fig, stem)


# ---------------------------------------------------------------------------------- scatter


def paper_points() -> pd.DataFrame:
    """The paper's (Acc1, FID) pairs: one row per (setting, public, private, target, method)."""
    p = paper_tables()
    p = p[p["metric"].isin(["acc1", "fid"])]
    wide = p.pivot_table(index=["setting", "public", "private", "target", "method"], columns="metric",
                         values="value", aggfunc="first").reset_index()
    return wide.dropna(subset=["acc1", "fid"])


def plot_scatter(labelled: pd.DataFrame, stem: Path) -> list[Path] | None:
    """Accuracy-fidelity scatter: ours (filled) with the paper's same-setting points (hollow,
    joined to ours by a thin line) and, in a second panel, the paper's points for our settings
    that match none of ours (the reference trend)."""
    ours = labelled.dropna(subset=["acc1", "fid"]).copy()
    if ours.empty:
        return None
    ours["paper_setting"] = [("bido_defense" if d == "bido" else s) for s, d in zip(ours["setting"], ours["defense"])]
    pp = paper_points()
    key = ["setting", "public", "private", "target", "method"]
    ours_key = pd.DataFrame({"setting": ours["paper_setting"], "public": ours["public"], "private": ours["private"],
                             "target": ours["target"], "method": ours["method_label"], "acc1": ours["acc1"],
                             "fid": ours["fid"]})
    exact = ours_key.merge(pp, on=key, how="inner", suffixes=("", "_paper"))
    matched = set(map(tuple, exact[key].to_numpy()))
    ref = pp[pp["setting"].isin(set(ours["paper_setting"])) & ~pp[key].apply(tuple, axis=1).isin(matched)]

    ncols = 2 if len(ref) else 1
    fig = Figure(figsize=(5.6 * ncols, 4.2))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    ax = axes[0]
    for label, g in sorted(ours.groupby("method_label"), key=lambda kv: order_key(kv[0], METHOD_ORDER)):
        ax.scatter(g["fid"], 100.0 * g["acc1"], color=method_color(label), label=label, s=28, zorder=3)
    if len(exact):
        for _, r in exact.iterrows():
            c = method_color(r["method"])
            ax.plot([r["fid"], r["fid_paper"]], [100 * r["acc1"], 100 * r["acc1_paper"]], color=c, lw=0.6, alpha=0.6)
        for label, g in exact.groupby("method"):
            ax.scatter(g["fid_paper"], 100.0 * g["acc1_paper"], facecolors="none", edgecolors=method_color(label),
                       s=48, linewidths=1.2, label=f"{label} (paper, same setting)", zorder=4)
    ax.set_xlabel("FID ↓")
    ax.set_ylabel("Acc1 (%) ↑")
    ax.set_title("Accuracy vs fidelity: this grid")
    ax.legend(fontsize=7)
    if len(ref):
        ax = axes[1]
        for label, g in sorted(ref.groupby("method"), key=lambda kv: order_key(kv[0], METHOD_ORDER)):
            ax.scatter(g["fid"], 100.0 * g["acc1"], marker="D", color=method_color(label), label=label, s=24)
        settings = ", ".join(sorted(ref["setting"].unique()))
        ax.set_xlabel("FID ↓")
        ax.set_ylabel("Acc1 (%) ↑")
        ax.set_title(f"Paper reference (not comparable): {settings}", fontsize=9)
        ax.legend(fontsize=7)
    return save(fig, stem)

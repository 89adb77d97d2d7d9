"""The paper's table layouts, filled from our results and from the paper's own numbers.

A :class:`TableSpec` says which grid points a paper table takes (``select``), what its rows are
(method labels, or the ablation flags of Table X), which context fields (public / private dataset,
target classifier) form row groups and column groups, and its metric columns. The same spec lays
out our cells and the paper's, so the two tables can be read side by side.

Rules worth knowing:

* values are the grid point's ``class == 'all'`` rows of results.csv;
* context fields that vary inside a table but are not one of its groups are added to the column
  groups (or row groups, ``spill='row'``), and those that are constant go to the caption;
* when several points fall into one cell (e.g. a sweep over k inside the ``standard`` setting),
  each keeps its own row, labelled with the hyperparameters that tell them apart (``Diff-MI (k=10)``);
* best values are marked per column inside each row group, by metric direction, when at least two
  values are compared (ties are all marked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from diffmi_ray.reporting.names import (
    ABLATION_ORDER, DATASET_ORDER, HYPER_LABELS, METHOD_ORDER, TARGET_ORDER, ablation_label,
    dataset_label, direction, format_hyper, method_label, order_key, target_label,
)
from diffmi_ray.reporting.paper import paper_tables
from diffmi_ray.reporting.results import Results

CONTEXT = ("public", "private", "target")
ATTACK_METRICS = ("acc1", "acc5", "fid", "knn_dist")
QUALITY_METRICS = ("psnr", "ssim", "fsim", "vsi", "haarpsi", "srsim", "dss", "mdsi", "lpips_alex", "lpips_vgg")
BASELINES_GAN = ("GMI", "KED-MI", "PLG-MI", "Diff-MI")
CELL_COLUMNS = ("table", "source", "setting", "public", "private", "target", "method", "row", "point",
                "row_group", "col_group", "metric", "value", "best")


@dataclass(frozen=True)
class TableSpec:
    """Layout of one paper table.

    id: the paper's roman numeral ("I" ... "X"); number: its arabic number.
    select: labelled points (see :func:`label_points`) -> the points the table takes, with columns
        ``setting_key`` (the paper's setting of the cell) and ``row`` (the row label) added.
    row_groups / col_groups: context fields forming row / column groups, in label order.
    spill: where varying context fields that are not groups go ("row" or "col").
    rows_from: what a paper row's label is ("method", or "setting" for Table X).
    """

    id: str
    number: int
    title: str
    metrics: tuple[str, ...]
    select: Callable[[pd.DataFrame], pd.DataFrame]
    row_groups: tuple[str, ...] = ()
    col_groups: tuple[str, ...] = ()
    spill: str = "col"
    rows_from: str = "method"
    row_order: tuple[str, ...] = METHOD_ORDER

    @property
    def slug(self) -> str:
        """File stem: ``table_I``."""
        return f"table_{self.id}"


def label_points(results: Results) -> pd.DataFrame:
    """Our points with the paper's spellings added: ``method_label``, ``public``, ``private``,
    ``target`` and ``ablation`` (Table X flags). Only points with at least one metric value."""
    p = results.points.reset_index()
    p = p[p[results.metrics].notna().any(axis=1)] if results.metrics else p.iloc[0:0]
    p = p.copy()
    p["method_label"] = [method_label(m, ft, d) for m, ft, d in zip(p["method"], p["finetune"], p["defense"])]
    p["public"] = [dataset_label(v) for v in p["public_dataset"]]
    p["private"] = [dataset_label(v) for v in p["private_dataset"]]
    p["target"] = [target_label(v) for v in p["target_model"]]
    p["ablation"] = [ablation_label(ft, pg, lo) for ft, pg, lo in zip(p["finetune"], p["pgd"], p["loss"])]
    return p


# ---------------------------------------------------------------------------------------- select


def _select_methods(settings: tuple[str, ...], methods: tuple[str, ...], needs: str | None = None):
    """Points of ``settings`` without a defense whose label is in ``methods``; if ``needs`` is set,
    nothing unless some point has that label (Table IV needs PPA, Table V needs VMI)."""

    def select(p: pd.DataFrame) -> pd.DataFrame:
        m = p["setting"].isin(settings) & p["method_label"].isin(methods) & (p["defense"] == "none")
        out = p[m].copy()
        if needs is not None and not (out["method_label"] == needs).any():
            return out.iloc[0:0]
        out["setting_key"] = out["setting"]
        out["row"] = out["method_label"]
        return out

    return select


def _select_bido(p: pd.DataFrame) -> pd.DataFrame:
    """Table VII: Diff-MI under BiDO beside the undefended standard-setting attacks on the same
    (public, private, target)."""
    bido = p[(p["method"] == "diff_mi") & (p["defense"] == "bido")].copy()
    if bido.empty:
        return bido
    base = _select_methods(("standard",), BASELINES_GAN)(p)
    ctx = set(map(tuple, bido[list(CONTEXT)].to_numpy()))
    base = base[np.array([tuple(r) in ctx for r in base[list(CONTEXT)].to_numpy()], dtype=bool)]
    bido["setting_key"] = "bido_defense"
    bido["row"] = bido["method_label"]
    return pd.concat([base, bido])


_X_SAME = ("setting", "public", "private", "target", "eval_model", "image_size", "k", "alpha")


def _select_ablation(p: pd.DataFrame) -> pd.DataFrame:
    """Table X: per (setting, public, private, target), one block around a reference Diff-MI point
    (FT=1, PGD=1, Lcls=ours) holding the points that differ from it only in finetune / pgd / loss
    (and finetune_layers where fine-tuning is off). Blocks with fewer than two distinct flag sets are
    dropped; of several blocks in one context the one with most flag sets (then lowest point id) is
    kept. Other Diff-MI points (sweeps over k, alpha, L) are Fig. 6's business."""
    d = p[(p["method"] == "diff_mi") & (p["defense"] == "none")].sort_values("point")
    blocks = []
    for _, r in d[d["ablation"] == ABLATION_ORDER[0]].iterrows():
        mask = pd.Series(True, index=d.index)
        for c in _X_SAME:
            mask &= (d[c] == r[c]) | (d[c].isna() & pd.isna(r[c]))
        same_l = (d["finetune_layers"] == r["finetune_layers"]) | (
            d["finetune_layers"].isna() & pd.isna(r["finetune_layers"]))
        members = d[mask & (same_l | (d["finetune"] == False))]  # noqa: E712  (object column of bools)
        if members["ablation"].nunique() >= 2:
            blocks.append((tuple(r[c] for c in ("setting", *CONTEXT)), members["ablation"].nunique(),
                           r["point"], members))
    kept: dict[tuple, tuple] = {}
    for ctx, n, ref, members in blocks:
        if ctx not in kept or n > kept[ctx][0]:
            kept[ctx] = (n, ref, members)
    if not kept:
        return d.iloc[0:0].assign(setting_key=[], row=[])
    out = pd.concat([m for _, _, m in kept.values()]).copy()
    out["setting_key"] = out["ablation"]
    out["row"] = out["ablation"]
    out["method_label"] = "Diff-MI"
    return out


TABLES: dict[str, TableSpec] = {
    s.id: s
    for s in (
        TableSpec("I", 1, "Attack performance comparison in the standard setting", ATTACK_METRICS,
                  _select_methods(("standard",), BASELINES_GAN), col_groups=("target",)),
        TableSpec("II", 2, "Attack performance comparison in the distributional shift setting (A → B)",
                  ATTACK_METRICS, _select_methods(("distribution_shift",), BASELINES_GAN),
                  row_groups=("target",), col_groups=("public", "private")),
        TableSpec("III", 3, "Reconstruction quality assessment (A + B: public dataset + target classifier)",
                  QUALITY_METRICS, _select_methods(("standard", "distribution_shift"), BASELINES_GAN),
                  row_groups=("public", "target"), spill="row"),
        TableSpec("IV", 4, "Attack performance between Diff-MI and PPA",
                  ATTACK_METRICS + QUALITY_METRICS,
                  _select_methods(("distribution_shift",), ("PPA", "Diff-MI"), needs="PPA"),
                  row_groups=("target",), spill="row"),
        TableSpec("V", 5, "Attack performance between Diff-MI and VMI", ATTACK_METRICS + QUALITY_METRICS,
                  _select_methods(("standard",), ("VMI", "Diff-MI"), needs="VMI"),
                  row_groups=("target",), spill="row"),
        TableSpec("VI", 6, "MIAs in high resolution compared with PPA", ATTACK_METRICS,
                  _select_methods(("high_res_224",), ("PPA", "Diff-MI")), row_groups=("target",), spill="row"),
        TableSpec("VII", 7, "Diff-MI confronts the BiDO defense, compared with the baselines",
                  ("acc1", "acc5", "fid") + QUALITY_METRICS, _select_bido, col_groups=("target",)),
        TableSpec("IX", 9, "Attack performance on fine-grained and medical data (A → B)", ATTACK_METRICS,
                  _select_methods(("fine_grained", "medical"), BASELINES_GAN),
                  row_groups=("public", "private"), spill="row"),
        TableSpec("X", 10, "Ablation study of the components of Diff-MI", ATTACK_METRICS, _select_ablation,
                  col_groups=("target",), rows_from="setting", row_order=ABLATION_ORDER),
    )
}


# ----------------------------------------------------------------------------------------- cells


def disambiguate(points: pd.DataFrame, key: list[str], label: str = "row") -> pd.Series:
    """Labels ``points[label]``, told apart where several points share one ``key``.

    Within such a group each point's label gets the hyperparameters (of :data:`HYPER_LABELS`) in
    which it differs from the group's most common value, e.g. ``Diff-MI (k=10)``; the point that
    differs in none keeps the bare label. Labels that would still collide get the point id.
    """
    rows = points[label].astype(object).copy()
    for _, grp in points.groupby(key, dropna=False, sort=False):
        if len(grp) < 2:
            continue
        idx = grp.index
        as_str = {c: grp[c].astype(str) for c in HYPER_LABELS if c in grp}
        modes = {c: v.mode().iloc[0] for c, v in as_str.items() if v.nunique() > 1}
        for i in idx:
            diffs = [format_hyper(c, points.at[i, c]) for c in modes if as_str[c].at[i] != modes[c]]
            rows.at[i] = f"{points.at[i, label]} ({', '.join(diffs)})" if diffs else points.at[i, label]
        labels = rows.loc[idx]
        for i in labels[labels.duplicated(keep=False)].index:
            rows.at[i] = f"{rows.at[i]} [{points.at[i, 'point']}]"
    return rows


def our_cells(spec: TableSpec, labelled: pd.DataFrame) -> pd.DataFrame:
    """Long cells of ``spec`` from our labelled points (one row per point x metric, NaN kept).

    Columns: table, source ('ours'), setting (paper key), public, private, target, method, row,
    point, metric, value.
    """
    sel = spec.select(labelled)
    if sel.empty:
        return pd.DataFrame(columns=list(CELL_COLUMNS[:9]) + ["metric", "value"])
    sel = sel.copy()
    sel["row"] = disambiguate(sel, [*CONTEXT, "row"])
    rows = []
    for _, r in sel.iterrows():
        for m in spec.metrics:
            rows.append({"table": spec.id, "source": "ours", "setting": r["setting_key"],
                         "public": r["public"], "private": r["private"], "target": r["target"],
                         "method": r["method_label"], "row": r["row"], "point": r["point"], "metric": m,
                         "value": float(r[m]) if m in r and pd.notna(r[m]) else np.nan})
    return pd.DataFrame(rows)


def paper_cells(spec: TableSpec, rows: set[str] | None = None) -> pd.DataFrame:
    """Long cells of the paper's own Table ``spec.id``; ``rows`` keeps only those row labels."""
    p = paper_tables(spec.id)
    p = p[p["metric"].isin(spec.metrics)].copy()
    p["row"] = p["setting"] if spec.rows_from == "setting" else p["method"]
    if rows is not None:
        p = p[p["row"].isin(rows)]
    p["source"] = "paper"
    p["point"] = None
    return p[["table", "source", "setting", "public", "private", "target", "method", "row", "point",
              "metric", "value"]].reset_index(drop=True)


# ---------------------------------------------------------------------------------------- layout


def _group_label(fields: tuple[str, ...], rec: dict, spill: tuple[str, ...] = ()) -> str | None:
    """Group label from context fields: ``VGG16``, ``FFHQ → CelebA``, ``CelebA + VGG16`` (Table III's
    "public + target" style), with spilled fields merged in (``FFHQ → CelebA + IR152``,
    ``mnist5k → mnist5k · small_cnn``)."""
    fs = set(fields) | set(spill)
    if not fs:
        return None
    parts = []
    if "public" in fs and "private" in fs:
        parts.append(f"{rec['public']} → {rec['private']}")
    elif "public" in fs:
        parts.append(str(rec["public"]))
    elif "private" in fs:
        parts.append(f"D_pri = {rec['private']}")
    if "target" in fs:
        parts.append(str(rec["target"]))
    return (" + " if fields == ("public", "target") else " · ").join(parts)


def _group_sort_key(label: str) -> tuple:
    parts = []
    for tok in label.replace("→", "·").replace("+", "·").split("·"):
        tok = tok.strip()
        order = TARGET_ORDER if tok in TARGET_ORDER else DATASET_ORDER
        parts.append(order_key(tok, order))
    return tuple(parts)


@dataclass
class LayoutTable:
    """One table in a paper layout.

    frame: values (float); index ``row`` or (``row_group``, ``row``); columns ``metric`` or
        (``col_group``, ``metric``). best: same shape, True where a cell is marked best.
    cells: the long cells it was built from, with ``row_group``, ``col_group`` and ``best``.
    caption: the paper's title plus the constant context (D_pub, D_pri, T).
    """

    spec: TableSpec
    source: str
    frame: pd.DataFrame
    best: pd.DataFrame
    cells: pd.DataFrame
    caption: str
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """``table_I`` for ours, ``table_I_paper`` for the paper's."""
        return self.spec.slug + ("" if self.source == "ours" else f"_{self.source}")

    @property
    def title(self) -> str:
        who = "ours" if self.source == "ours" else "as reported in the paper"
        return f"Table {self.spec.id} ({who}): {self.spec.title}"


def layout(spec: TableSpec, cells: pd.DataFrame, source: str) -> LayoutTable:
    """Pivot long ``cells`` (one source) into ``spec``'s layout and mark the best values."""
    cells = cells.copy()
    constant = [f for f in CONTEXT if cells[f].nunique(dropna=False) <= 1]
    spill = tuple(f for f in CONTEXT if f not in constant and f not in spec.row_groups + spec.col_groups)
    rg_spill, cg_spill = (spill, ()) if spec.spill == "row" else ((), spill)
    recs = cells.to_dict("records")
    cells["row_group"] = [_group_label(spec.row_groups, r, rg_spill) for r in recs]
    cells["col_group"] = [_group_label(spec.col_groups, r, cg_spill) for r in recs]

    has_rg = cells["row_group"].notna().any()
    has_cg = cells["col_group"].notna().any()
    if not has_rg:
        cells["row_group"] = ""
    if not has_cg:
        cells["col_group"] = ""

    # Best per (row group, column) among >= 2 values, by metric direction.
    best = pd.Series(False, index=cells.index)
    for (_, _, metric), grp in cells.groupby(["row_group", "col_group", "metric"], sort=False):
        d = direction(metric)
        vals = grp["value"].dropna()
        if d == 0 or len(vals) < 2:
            continue
        target = vals.max() if d > 0 else vals.min()
        best.loc[vals.index[np.isclose(vals.to_numpy(), target, rtol=0, atol=1e-12)]] = True
    cells["best"] = best

    row_groups = sorted(cells["row_group"].unique(), key=_group_sort_key)
    col_groups = sorted(cells["col_group"].unique(), key=_group_sort_key)
    row_labels = sorted(cells["row"].unique(), key=lambda r: order_key(r, spec.row_order))
    metrics = list(spec.metrics)

    present = set(zip(cells["row_group"], cells["row"]))
    index = pd.MultiIndex.from_tuples([(g, r) for g in row_groups for r in row_labels if (g, r) in present],
                                      names=["row_group", "row"])
    columns = pd.MultiIndex.from_tuples([(g, m) for g in col_groups for m in metrics], names=["col_group", "metric"])
    keys = ["row_group", "row", "col_group", "metric"]
    if cells.duplicated(keys).any():  # cannot happen: rows are disambiguated per context
        raise AssertionError(f"duplicate cells in table {spec.id}")
    frame = cells.pivot(index=["row_group", "row"], columns=["col_group", "metric"], values="value")
    frame = frame.reindex(index=index, columns=columns).astype(float)
    marks = cells.assign(best=cells["best"].astype(float)).pivot(
        index=["row_group", "row"], columns=["col_group", "metric"], values="best")
    marks = marks.reindex(index=index, columns=columns).fillna(0.0).astype(bool)
    if not has_rg:
        frame.index = frame.index.droplevel(0)
        marks.index = marks.index.droplevel(0)
    if not has_cg:
        frame.columns = frame.columns.droplevel(0)
        marks.columns = marks.columns.droplevel(0)

    names = {"public": "D_pub", "private": "D_pri", "target": "T"}
    ctx = ", ".join(f"{names[f]} = {cells[f].iloc[0]}" for f in constant if f not in spec.row_groups + spec.col_groups)
    caption = f"Table {spec.id}: {spec.title}" + (f" ({ctx})" if ctx else "")
    if source != "ours":
        caption += " — as reported in the paper (reference)"
    return LayoutTable(spec, source, frame, marks, cells, caption)


def build_tables(results: Results) -> tuple[list[tuple[LayoutTable, LayoutTable | None]], pd.DataFrame, dict[str, str]]:
    """Every paper table our results can fill, each with the paper's version restricted to our rows.

    Returns (pairs of (ours, paper or None), all our cells, {table id: why it was not built}).
    """
    labelled = label_points(results)
    pairs, all_cells, skipped = [], [], {}
    for spec in TABLES.values():
        cells = our_cells(spec, labelled)
        if cells.empty or cells["value"].notna().sum() == 0:
            skipped[spec.slug] = _why_not(spec)
            continue
        all_cells.append(cells)
        ours = layout(spec, cells, "ours")
        base_rows = {r.split(" (", 1)[0] for r in cells["row"]}
        pc = paper_cells(spec, base_rows)
        paper = layout(spec, pc, "paper") if not pc.empty else None
        pairs.append((ours, paper))
    cells = pd.concat(all_cells, ignore_index=True) if all_cells else pd.DataFrame(columns=list(CELL_COLUMNS))
    return pairs, cells, skipped


def _why_not(spec: TableSpec) -> str:
    reasons = {
        "I": "no standard-setting points of GMI / KED-MI / PLG-MI / Diff-MI with metric values",
        "II": "no distribution_shift points of GMI / KED-MI / PLG-MI / Diff-MI with metric values",
        "III": "no standard / distribution_shift points with reconstruction-quality metrics",
        "IV": "no distribution_shift points of PPA (with Diff-MI) with metric values",
        "V": "no standard-setting points of VMI (with Diff-MI) with metric values",
        "VI": "no high_res_224 points with metric values",
        "VII": "no Diff-MI points under the BiDO defense (defense: bido)",
        "IX": "no fine_grained / medical points with metric values",
        "X": "no Diff-MI points that differ only in finetune / pgd / loss from an FT=1,PGD=1,Lcls=ours point",
    }
    return reasons.get(spec.id, "no matching points")


__all__ = ["TABLES", "TableSpec", "LayoutTable", "label_points", "disambiguate", "our_cells", "paper_cells", "layout",
           "build_tables"]

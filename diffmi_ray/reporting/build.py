"""``build_report``: tables, paper comparison, plots, image grids and ``report.html`` from a saved
results folder. Reads files only (no Ray, no torch), so it works on a copy of the folder.

Report folder (default ``<results_dir>/report/``)::

    report.html                    everything below in one static page (images embedded)
    report.md                      all tables and the comparison in Markdown, figures linked
    index.json                     the ReportIndex: every file written, and what was skipped and why
    tables/table_<N>.{md,csv,tex}  our numbers in the layout of the paper's Table N (N in I-VII, IX, X)
    tables/table_<N>_paper.{csv,tex}   the paper's Table N in the same layout, restricted to our rows
    tables/paper_comparison.{md,csv,tex}   ours beside the paper's (exact match or reference trend)
    tables/cells.csv               every table cell, long, with its best mark (ours and paper)
    tables/points.csv              one row per grid point: descriptors, status, every metric
    plots/fig6a_change_rates.{png,pdf}, plots/fig6b_finetune_layers.{png,pdf}, plots/fig6c_k.{png,pdf},
    plots/fig6d_alpha.{png,pdf}, plots/acc_fid_scatter.{png,pdf}
    images/images_<setting>_<public>_<private>_<target>.{png,pdf}   Fig. 3-5 style grids
"""

from __future__ import annotations

import html as _html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from diffmi_ray.reporting import html as H
from diffmi_ray.reporting import plots as P
from diffmi_ray.reporting.images import image_grids
from diffmi_ray.reporting.names import format_value
from diffmi_ray.reporting.paper import compare
from diffmi_ray.reporting.render import (
    frame_to_html, frame_to_latex, frame_to_markdown, to_csv, to_html, to_latex, to_markdown,
)
from diffmi_ray.reporting.results import Results, load_results
from diffmi_ray.reporting.tables import LayoutTable, build_tables, label_points


@dataclass
class ReportIndex:
    """What :func:`build_report` wrote.

    tables: name -> files (``table_I`` -> md, csv, tex; ``table_I_paper`` -> csv, tex;
        ``paper_comparison``, ``cells``, ``points``).
    plots / image_grids: figure stem -> [png, pdf].
    skipped: table or figure name -> why the results could not fill it.
    """

    results_dir: Path
    out_dir: Path
    html: Path
    markdown: Path
    tables: dict[str, list[Path]] = field(default_factory=dict)
    plots: dict[str, list[Path]] = field(default_factory=dict)
    image_grids: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def files(self) -> list[Path]:
        """Every file written (tables, plots, image grids, report.html, report.md, index.json)."""
        out = [self.html, self.markdown, self.out_dir / "index.json"]
        for group in (self.tables, self.plots, self.image_grids):
            for paths in group.values():
                out += paths
        return out

    def to_json(self) -> dict:
        rel = lambda p: p.relative_to(self.out_dir).as_posix()  # noqa: E731
        return {
            "results_dir": str(self.results_dir), "out_dir": str(self.out_dir),
            "html": rel(self.html), "markdown": rel(self.markdown),
            "tables": {k: [rel(p) for p in v] for k, v in self.tables.items()},
            "plots": {k: [rel(p) for p in v] for k, v in self.plots.items()},
            "image_grids": {k: [rel(p) for p in v] for k, v in self.image_grids.items()},
            "skipped": self.skipped,
        }


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def format_diff(metric: str, value) -> str:
    """Signed difference ours - paper: accuracies in percentage points."""
    if pd.isna(value):
        return "–"
    if metric.startswith("acc"):
        return f"{100.0 * value:+.2f} pp"
    return f"{value:+.2f}" if metric in ("fid", "fid_evalnet", "knn_dist", "psnr") else f"{value:+.4f}"


def comparison_views(cmp: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Human views of the comparison, per table: ``exact`` (ours, paper, diff) and ``reference``
    (ours beside the paper's value for each of its own dataset/target contexts)."""
    views = []
    for table in dict.fromkeys(cmp["table"]):
        t = cmp[cmp["table"] == table]
        ex = t[t["match"] == "exact"]
        if len(ex):
            views.append((table, "exact", pd.DataFrame({
                "setting": ex["setting"], "data": ex["public"] + " → " + ex["private"], "target": ex["target"],
                "row": ex["row"], "point": ex["point"], "metric": ex["metric"],
                "ours": [format_value(m, v) for m, v in zip(ex["metric"], ex["ours"])],
                "paper": [format_value(m, v) for m, v in zip(ex["metric"], ex["paper"])],
                "diff (ours − paper)": [format_diff(m, v) for m, v in zip(ex["metric"], ex["diff"])],
            }).reset_index(drop=True)))
        ref = t[t["match"] == "reference"].copy()
        if len(ref):
            ref["paper_ctx"] = ("paper: " + ref["paper_public"] + " → " + ref["paper_private"] + " · "
                                + ref["paper_target"])
            ref["ours_f"] = [format_value(m, v) for m, v in zip(ref["metric"], ref["ours"])]
            ref["paper_f"] = [format_value(m, v) for m, v in zip(ref["metric"], ref["paper"])]
            ref["data"] = ref["public"] + " → " + ref["private"]
            idx = ["setting", "data", "target", "row", "point", "metric", "ours_f"]
            wide = ref.pivot_table(index=idx, columns="paper_ctx", values="paper_f", aggfunc="first", sort=False)
            wide = wide[list(pd.unique(ref["paper_ctx"]))].reset_index().rename(columns={"ours_f": "ours"})
            wide.columns.name = None
            views.append((table, "reference", wide.fillna("–")))
    return views


def _table_files(pair: tuple[LayoutTable, LayoutTable | None], tdir: Path) -> dict[str, list[Path]]:
    ours, paper = pair
    md = f"## Table {ours.spec.id}\n\n### Ours\n\n{to_markdown(ours)}\n"
    if paper is not None:
        md += ("### As reported in the paper (reference; other scale unless the datasets and target match)\n\n"
               f"{to_markdown(paper)}\n")
    out = {ours.name: [_write(tdir / f"{ours.name}.md", md), _write(tdir / f"{ours.name}.csv", to_csv(ours)),
                       _write(tdir / f"{ours.name}.tex", to_latex(ours))]}
    if paper is not None:
        out[paper.name] = [_write(tdir / f"{paper.name}.csv", to_csv(paper)),
                           _write(tdir / f"{paper.name}.tex", to_latex(paper))]
    return out


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, *, embed_images: bool = True,
                 n_classes: int = 8) -> ReportIndex:
    """Build the report of one grid's results folder (see the module docstring for what is written).

    results_dir: ``<storage>/<grid_name>/`` holding results.csv (a :class:`~diffmi_ray.errors.UserError`
        otherwise). out_dir: default ``<results_dir>/report/``. embed_images: embed figures in
        report.html as base64 (else link them relatively). n_classes: classes per image grid.
    """
    results = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else results.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    tdir, pdir, idir = out / "tables", out / "plots", out / "images"
    index = ReportIndex(results.root, out, out / "report.html", out / "report.md")

    # Tables and the paper comparison.
    pairs, cells, skipped = build_tables(results)
    index.skipped.update(skipped)
    for pair in pairs:
        index.tables.update(_table_files(pair, tdir))
    cmp = compare(cells)
    views = comparison_views(cmp)
    cmp_md = "## Paper comparison\n\n" + _COMPARISON_NOTE + "\n\n" + "\n\n".join(
        f"### Table {t}: {'exact matches' if kind == 'exact' else 'reference trend (paper at its own scale)'}\n\n"
        + frame_to_markdown(v) for t, kind, v in views) + "\n"
    index.tables["paper_comparison"] = [
        _write(tdir / "paper_comparison.md", cmp_md),
        _write(tdir / "paper_comparison.csv", cmp.to_csv(index=False)),
        _write(tdir / "paper_comparison.tex", "\n".join(
            frame_to_latex(v, f"Table {t}: ours beside the paper's numbers ("
                           + ("exact matches)" if kind == "exact" else "reference trend, paper at its own scale)"),
                           f"paper_comparison_{t}_{kind}") for t, kind, v in views)
               or "% no cell of ours has a paper counterpart\n"),
    ]
    layouts = [t for pair in pairs for t in pair if t is not None]
    all_cells = pd.concat([t.cells for t in layouts], ignore_index=True) if layouts else pd.DataFrame()
    index.tables["cells"] = [_write(tdir / "cells.csv", all_cells.to_csv(index=False))]
    index.tables["points"] = [_write(tdir / "points.csv", results.points.reset_index().to_csv(index=False))]

    # Plots.
    labelled = label_points(results)
    made = P.plot_change_rates(results, labelled, pdir / "fig6a_change_rates")
    _record(index, "fig6a_change_rates", made, "no Diff-MI point has a change_rates.json")
    for x, (stem, _, _) in P.SWEEPS.items():
        made = P.plot_sweep(labelled, x, pdir / stem)
        _record(index, stem, made, f"no Diff-MI sweep over {x} (points identical but for {x}, with >= 2 values)")
    made = P.plot_scatter(labelled, pdir / "acc_fid_scatter")
    _record(index, "acc_fid_scatter", made, "no point has both acc1 and fid")

    # Image grids.
    grids = image_grids(results, labelled, idir, n_classes=n_classes)
    for g in grids:
        index.image_grids[g.files[0].stem] = g.files
    if not grids:
        index.skipped["image_grids"] = "no point has a samples.npz"

    _write(index.markdown, _markdown(results, index, pairs, cmp_md))
    _write(index.html, _html_page(results, index, pairs, views, grids, embed_images))
    _write(out / "index.json", json.dumps(index.to_json(), indent=2))
    return index


_COMPARISON_NOTE = (
    "Rule: a cell of ours joins a paper number on (table, setting, public dataset, private dataset, target, "
    "method, metric) in the paper's spellings — an *exact* match, shown with the difference ours − paper. "
    "Without one, the paper's numbers for the same (table, setting, method, metric) are shown as the "
    "*reference trend* at the paper's scale: not comparable, never a pass or fail.")


def _record(index: ReportIndex, name: str, made: list[Path] | None, why: str) -> None:
    if made:
        index.plots[name] = made
    else:
        index.skipped[name] = why


def _markdown(results: Results, index: ReportIndex, pairs, cmp_md: str) -> str:
    rel = lambda p: p.relative_to(index.out_dir).as_posix()  # noqa: E731
    parts = [f"# Report: grid `{results.grid_name}`\n",
             f"Results: `{results.root}` — {len(results.points)} grid points.\n"]
    for ours, paper in pairs:
        parts.append((index.out_dir / "tables" / f"{ours.name}.md").read_text())
    parts.append(cmp_md)
    parts.append("## Figures\n")
    for name, paths in {**index.plots, **index.image_grids}.items():
        parts.append(f"![{name}]({rel(paths[0])}) ([PDF]({rel(paths[1])}))\n")
    if index.skipped:
        parts.append("## Not built\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in index.skipped.items()) + "\n")
    return "\n".join(parts)


def _html_page(results: Results, index: ReportIndex, pairs, views, grids, embed: bool) -> str:
    root = index.out_dir
    sections = []
    body = []
    for ours, paper in pairs:
        body.append(f'<h3>Table {ours.spec.id}</h3><div class="pair">{to_html(ours)}'
                    + (to_html(paper) if paper is not None else "") + "</div>")
    not_built = {k: v for k, v in index.skipped.items() if k.startswith("table_")}
    if not_built:
        body.append('<p class="note">Not built: ' + "; ".join(
            f"{_html.escape(k)} ({_html.escape(v)})" for k, v in not_built.items()) + "</p>")
    sections.append(H.Section("tables", "Tables", "\n".join(body)))

    body = [f'<p class="note">{_html.escape(_COMPARISON_NOTE)}</p>', '<div id="paper_comparison">']
    for table, kind, v in views:
        title = "exact matches (ours vs paper)" if kind == "exact" else "reference trend (paper at its own scale)"
        body.append(f"<h3>Table {_html.escape(table)}: {title}</h3>" + frame_to_html(v, f"comparison_{table}_{kind}"))
    if not views:
        body.append('<p class="note">No cell of ours has a paper counterpart.</p>')
    body.append("</div>")
    sections.append(H.Section("comparison", "Paper comparison", "\n".join(body)))

    captions = {"fig6a_change_rates": "Fig. 6a: change rate per middle-block layer",
                "fig6b_finetune_layers": "Fig. 6b: Acc and FID vs number of fine-tuned layers",
                "fig6c_k": "Fig. 6c: Acc and FID vs k", "fig6d_alpha": "Fig. 6d: Acc and FID vs α",
                "acc_fid_scatter": "Accuracy vs fidelity (Acc1 vs FID)"}
    body = [H.figure(paths[0], root, captions.get(name, name), "plot", embed, paths[1:])
            for name, paths in index.plots.items()]
    missing_plots = {k: v for k, v in index.skipped.items() if k in captions}
    if missing_plots:
        body.append('<p class="note">Not drawn: ' + "; ".join(
            f"{_html.escape(k)} ({_html.escape(v)})" for k, v in missing_plots.items()) + "</p>")
    sections.append(H.Section("plots", "Plots", "\n".join(body)))

    body = [H.figure(g.files[0], root, f"{g.title} — first row private images, then one row per method",
                     "grid", embed, g.files[1:]) for g in grids]
    sections.append(H.Section("images", "Image grids", "\n".join(body) or '<p class="note">No samples saved.</p>'))

    pts = results.points.reset_index()
    show = [c for c in ("point", "method", "setting", "public_dataset", "private_dataset", "target_model",
                        "defense", "finetune", "finetune_layers", "pgd", "loss", "k", "alpha", "status")
            if c in pts]
    sections.append(H.Section("points", "Grid points", frame_to_html(pts[show].astype(object), "points", "{:g}")))
    if len(results.missing):
        sections.append(H.Section("missing", "Missing metrics", frame_to_html(results.missing, "missing")))
    grid_yaml = results.grid_yaml()
    if grid_yaml:
        sections.append(H.Section("grid", "Grid file", f"<pre>{_html.escape(grid_yaml)}</pre>"))

    statuses = results.points["status"].value_counts().to_dict()
    intro = (f'<p class="note">Results folder <code>{_html.escape(str(results.root))}</code>: '
             f'{len(results.points)} grid points ({_html.escape(", ".join(f"{v} {k}" for k, v in statuses.items()))}). '
             "Built from the saved files only. Best values per column (by metric direction) are bold green; "
             "the paper's tables are shown beside ours in the same layout as the reference.</p>")
    return H.page(f"Report: grid {results.grid_name}", intro, sections)

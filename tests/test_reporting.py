"""Reports from the small hand-written results fixture (tests/fixtures/results_small/).

The report is built once per module from a copy of the fixture (so it also shows that a copied
results folder is enough); the fixture's numbers are listed in its _generate.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffmi_ray.errors import UserError
from diffmi_ray.reporting import TABLES, build_report, compare, load_results, paper_tables, resolve_results_dir
from diffmi_ray.reporting.names import ablation_label, direction, format_value, method_label
from diffmi_ray.reporting.plots import sweeps
from diffmi_ray.reporting.tables import build_tables, disambiguate, label_points, layout

FIXTURE = Path(__file__).parent / "fixtures" / "results_small"
LAYOUT_TABLES = ["table_I", "table_II", "table_III", "table_IV", "table_V", "table_VII", "table_X"]
PLOTS = ["fig6a_change_rates", "fig6b_finetune_layers", "fig6c_k", "fig6d_alpha", "acc_fid_scatter"]


@pytest.fixture(scope="module")
def results_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("results") / "small"
    shutil.copytree(FIXTURE, dst)
    return dst


@pytest.fixture(scope="module")
def report(results_copy):
    return build_report(results_copy)


@pytest.fixture(scope="module")
def results(results_copy):
    return load_results(results_copy)


@pytest.fixture(scope="module")
def tables(results):
    pairs, cells, skipped = build_tables(results)
    return {ours.spec.id: (ours, paper) for ours, paper in pairs}, cells, skipped


# ------------------------------------------------------------------------------ inputs and names


def test_resolve_results_dir_accepts_only_a_results_folder(tmp_path):
    assert resolve_results_dir(FIXTURE) == FIXTURE.resolve()
    with pytest.raises(UserError, match="no such results directory"):
        resolve_results_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="no results.csv"):
        resolve_results_dir(tmp_path)
    (tmp_path / "grid.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="got a file"):
        resolve_results_dir(tmp_path / "grid.yaml")


def test_results_csv_must_have_the_runner_columns(tmp_path):
    (tmp_path / "results.csv").write_text("grid,point,metric,value\ng,p0,acc1,0.5\n")
    with pytest.raises(UserError, match="missing column"):
        load_results(tmp_path)


def test_load_results(results):
    assert len(results.points) == 26
    assert results.points.loc["p0025", "status"] == "failed"
    assert math.isnan(results.points.loc["p0025", "acc1"])
    assert results.points.loc["p0004", "acc1"] == pytest.approx(0.80)
    assert results.points.loc["p0004", "finetune"] is True and results.points.loc["p0000", "finetune"] is None
    assert math.isnan(results.points.loc["p0005", "vsi"])  # listed in missing.csv
    assert list(results.missing["metric"]) == ["vsi"]
    assert {"acc1", "fid", "knn_dist", "lpips_vgg", "coverage"} <= set(results.metrics)


def test_names_map_to_the_paper_spellings():
    assert method_label("diff_mi", True, "none") == "Diff-MI"
    assert method_label("diff_mi", "False", "none") == "Diff-MI w/o FT"
    assert method_label("diff_mi", True, "bido") == "Diff-MI w/ BiDO"
    assert method_label("kedmi", None, None) == "KED-MI"
    assert ablation_label(True, False, "topk_preg") == "FT=1,PGD=0,Lcls=ours"
    assert ablation_label("True", "True", "max_margin") == "FT=1,PGD=1,Lcls=max-margin"
    assert direction("acc1") == 1 and direction("lpips_alex") == -1 and direction("knn_count") == 0
    assert format_value("acc1", 0.9347) == "93.47%" and format_value("fid", float("nan")) == "–"


def test_package_paper_tables_equal_the_shared_copy(shared_dir):
    for n in range(1, 11):
        ours = (Path(__file__).parents[1] / "diffmi_ray" / "data" / "paper_tables" / f"table{n}.csv").read_text()
        assert ours == (shared_dir / "paper" / "tables" / f"table{n}.csv").read_text()


# ------------------------------------------------------------------------------------- tables


def test_report_writes_the_fillable_tables_and_says_why_not_the_others(report):
    for name in LAYOUT_TABLES:
        assert [p.suffix for p in report.tables[name]] == [".md", ".csv", ".tex"]
        assert [p.suffix for p in report.tables[f"{name}_paper"]] == [".csv", ".tex"]
        assert all(p.stat().st_size > 0 for p in report.tables[name])
    assert set(report.skipped) == {"table_VI", "table_IX"}
    assert "high_res_224" in report.skipped["table_VI"] and "fine_grained" in report.skipped["table_IX"]
    assert report.out_dir == (report.results_dir / "report")
    assert all(p.is_file() for p in report.files())


def test_table_shapes(tables):
    t, _, _ = tables
    expected = {  # id: (rows, columns) of ours
        "I": (4, 2 * 4), "II": (2, 4), "III": (10, 10), "IV": (2, 14), "V": (4, 14), "VII": (5, 13), "X": (5, 4),
    }
    assert set(t) == set(expected)
    for tid, shape in expected.items():
        assert t[tid][0].frame.shape == shape, tid
        assert t[tid][0].best.shape == shape
    one = t["I"][0].frame
    assert list(one.index) == ["GMI", "KED-MI", "PLG-MI", "Diff-MI"]
    assert list(one.columns.get_level_values(0).unique()) == ["small_cnn", "small_resnet"]
    assert list(t["I"][1].frame.columns.get_level_values(0).unique()) == ["VGG16", "IR152", "FaceNet64"]
    assert t["I"][1].frame.shape == (4, 12)
    assert list(t["II"][0].frame.index) == [("IR152", "GMI"), ("IR152", "Diff-MI")]
    assert list(t["II"][0].frame.columns.get_level_values(0).unique()) == ["FFHQ → CelebA"]
    assert list(t["V"][0].frame.index) == [("small_cnn", "VMI"), ("small_cnn", "Diff-MI"),
                                          ("small_resnet", "VMI"), ("small_resnet", "Diff-MI")]
    assert list(t["VII"][0].frame.index) == ["GMI", "KED-MI", "PLG-MI", "Diff-MI", "Diff-MI w/ BiDO"]
    assert list(t["X"][0].frame.index) == ["FT=1,PGD=1,Lcls=ours", "FT=1,PGD=0,Lcls=ours", "FT=1,PGD=1,Lcls=CE",
                                           "FT=1,PGD=1,Lcls=max-margin", "FT=0,PGD=1,Lcls=ours"]
    assert t["X"][0].frame.loc["FT=1,PGD=1,Lcls=ours", ("small_cnn", "acc1")] == pytest.approx(0.78)
    assert "D_pub = mnist5k" in t["I"][0].caption


def test_table_csv_md_tex_follow_the_layout(report):
    csv = pd.read_csv(report.tables["table_I"][1])
    assert csv.shape == (4, 1 + 8)
    assert list(csv["method"]) == ["GMI", "KED-MI", "PLG-MI", "Diff-MI"]
    assert csv.loc[2, "small_cnn: Acc1 ↑"] == "85.00%*"
    md = report.tables["table_I"][0].read_text()
    assert "| PLG-MI | **85.00%** | **97.00%** | 110.00 |" in md
    assert "As reported in the paper" in md and "| Diff-MI | 93.47% |" in md
    tex = report.tables["table_I"][2].read_text()
    assert r"\multicolumn{4}{c}{small\_cnn}" in tex and r"\textbf{90.00}" in tex and r"\textbf{85.00\%}" in tex
    assert tex.count(r"\\") == 2 + 4  # group header, metric header, 4 method rows


def test_best_values_marked_by_metric_direction(tables):
    t, _, _ = tables
    best = t["I"][0].best
    assert list(best.index[best[("small_cnn", "acc1")]]) == ["PLG-MI"]  # higher is better
    assert list(best.index[best[("small_cnn", "fid")]]) == ["Diff-MI"]  # lower is better
    assert list(best.index[best[("small_resnet", "acc5")]]) == ["PLG-MI", "Diff-MI"]  # a tie marks both
    assert list(t["X"][0].best.index[t["X"][0].best[("small_cnn", "fid")]]) == ["FT=0,PGD=1,Lcls=ours"]
    # Every table, ours and the paper's: marks are exactly the best values per column and row group.
    for ours, paper in t.values():
        for lt in (ours, paper):
            for (rg, cg, metric), grp in lt.cells.groupby(["row_group", "col_group", "metric"]):
                vals = grp["value"].dropna()
                if direction(metric) == 0 or len(vals) < 2:
                    assert not grp["best"].any()
                    continue
                top = vals.max() if direction(metric) > 0 else vals.min()
                assert set(grp.index[grp["best"]]) == set(vals.index[np.isclose(vals, top)]), (lt.name, rg, cg, metric)


def test_a_lone_value_is_not_marked_best():
    cells = pd.DataFrame({"table": "I", "source": "ours", "setting": "standard", "public": "a", "private": "a",
                          "target": "t", "method": "GMI", "row": "GMI", "point": "p0", "metric": ["acc1", "fid"],
                          "value": [0.5, 10.0]})
    lt = layout(TABLES["I"], cells, "ours")
    assert lt.frame.shape == (1, 4) and not lt.best.to_numpy().any()


def test_the_failed_point_fills_no_cell(tables):
    _, cells, _ = tables
    assert "p0025" not in set(cells["point"]) and not cells.empty


def test_points_sharing_a_cell_keep_their_own_rows():
    pts = pd.DataFrame({"point": ["p1", "p2", "p3", "p4", "p5"], "row": ["Diff-MI"] * 4 + ["GMI"],
                        "ctx": "c", "k": [20.0, 10.0, 20.0, 20.0, np.nan], "alpha": [1.0, 1.0, 0.0, 1.0, np.nan]})
    rows = disambiguate(pts, ["ctx", "row"])
    assert list(rows) == ["Diff-MI [p1]", "Diff-MI (k=10)", "Diff-MI (α=0)", "Diff-MI [p4]", "GMI"]


# ---------------------------------------------------------------------------------- paper joins


def _paper_value(table, setting, public, private, target, method, metric) -> float:
    p = paper_tables(table)
    hit = p[(p.setting == setting) & (p.public == public) & (p.private == private) & (p.target == target)
            & (p.method == method) & (p.metric == metric)]
    assert len(hit) == 1
    return float(hit["value"].iloc[0])


def test_exact_paper_join_gives_the_difference(report):
    cmp = pd.read_csv(report.tables["paper_comparison"][1])
    row = cmp[(cmp.table == "IV") & (cmp.method == "Diff-MI") & (cmp.metric == "acc1")]
    assert len(row) == 1 and row["match"].iloc[0] == "exact"
    paper = _paper_value("IV", "distribution_shift", "FFHQ", "CelebA", "IR152", "Diff-MI", "acc1")
    assert row["paper"].iloc[0] == pytest.approx(paper)
    assert row["diff"].iloc[0] == pytest.approx(0.90 - paper)
    assert (row[["public", "private", "target"]].to_numpy() == [["FFHQ", "CelebA", "IR152"]]).all()
    exact = cmp[cmp.match == "exact"]
    assert set(exact["point"]) == {"p0010", "p0011", "p0012"}  # only the points with the paper's names
    assert set(exact["table"]) == {"II", "III", "IV"}


def test_cpu_scale_cells_get_the_reference_trend_not_a_verdict(report):
    cmp = pd.read_csv(report.tables["paper_comparison"][1])
    ref = cmp[(cmp.table == "I") & (cmp.point == "p0004") & (cmp.metric == "acc1")]
    assert set(ref["match"]) == {"reference"} and ref["diff"].isna().all()
    assert list(ref["paper_target"]) == ["VGG16", "IR152", "FaceNet64"]
    for _, r in ref.iterrows():
        assert r["paper"] == pytest.approx(_paper_value("I", "standard", "CelebA", "CelebA", r["paper_target"],
                                                        "Diff-MI", "acc1"))
    bido = cmp[(cmp.table == "VII") & (cmp.row == "Diff-MI w/ BiDO") & (cmp.metric == "fid")]
    assert list(bido["setting"]) == ["bido_defense"] and bido["paper"].iloc[0] == pytest.approx(
        _paper_value("VII", "bido_defense", "CelebA", "CelebA", "VGG16", "Diff-MI w/ BiDO", "fid"))
    ablation = cmp[(cmp.table == "X") & (cmp.setting == "FT=0,PGD=1,Lcls=ours") & (cmp.metric == "acc1")]
    assert ablation["paper"].iloc[0] == pytest.approx(0.7587)
    assert not (cmp["match"] == "pass").any() and "mnist5k" not in set(cmp["paper_public"])
    md = report.tables["paper_comparison"][0].read_text()
    assert "reference trend" in md and "paper: CelebA → CelebA · VGG16" in md


def test_join_rule_on_hand_made_cells():
    ours = pd.DataFrame([
        # exact: Table X flags, the paper's names
        dict(table="X", setting="FT=1,PGD=0,Lcls=ours", public="CelebA", private="CelebA", target="VGG16",
             method="Diff-MI", row="FT=1,PGD=0,Lcls=ours", point="a", metric="acc1", value=0.9),
        # reference: same table/setting/method/metric, other target
        dict(table="I", setting="standard", public="CelebA", private="CelebA", target="small_cnn",
             method="GMI", row="GMI", point="b", metric="fid", value=50.0),
        # nothing: the paper has no such setting
        dict(table="I", setting="my_setting", public="CelebA", private="CelebA", target="VGG16",
             method="GMI", row="GMI", point="c", metric="fid", value=50.0),
    ])
    cmp = compare(ours)
    a = cmp[cmp.point == "a"]
    assert list(a["match"]) == ["exact"] and a["paper"].iloc[0] == pytest.approx(0.9047)
    assert a["diff"].iloc[0] == pytest.approx(0.9 - 0.9047)
    b = cmp[cmp.point == "b"]
    assert list(b["match"]) == ["reference"] * 3 and b["diff"].isna().all()
    assert "c" not in set(cmp["point"])


# ------------------------------------------------------------------------------ plots and images


def test_every_plot_is_written_as_png_and_pdf(report):
    assert list(report.plots) == PLOTS
    for name in PLOTS:
        png, pdf = report.plots[name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000, name


def test_sweeps_found_for_fig6(results):
    labelled = label_points(results)
    for x, values in {"finetune_layers": [3, 5, 7], "k": [3, 5, 8], "alpha": [0, 1, 2]}.items():
        groups = sweeps(labelled, x)
        assert len(groups) == 1, x
        assert list(groups[0][x]) == values


def test_image_grids_one_per_context(report):
    assert len(report.image_grids) == 5
    for png, pdf in report.image_grids.values():
        assert png.stat().st_size > 5000 and pdf.stat().st_size > 1000
    assert "images_standard-mnist5k-mnist5k-small-cnn" in report.image_grids


def test_plots_do_not_use_pyplot():
    src = (Path(__file__).parents[1] / "diffmi_ray" / "reporting")
    assert not any("pyplot" in p.read_text() for p in src.glob("*.py"))


# ------------------------------------------------------------------------------------- html / md


def test_html_shows_every_table_plot_and_image(report):
    page = report.html.read_text()
    for name in LAYOUT_TABLES:
        assert f'id="{name}"' in page and f'id="{name}_paper"' in page
    assert 'id="paper_comparison"' in page and 'id="points"' in page
    for paths in list(report.plots.values()) + list(report.image_grids.values()):
        rel = paths[0].relative_to(report.out_dir).as_posix()
        assert f'data-file="{rel}"' in page
    assert page.count("data:image/png;base64,") == len(report.plots) + len(report.image_grids)
    assert '<b class="best">85.00%</b>' in page
    md = report.markdown.read_text()
    assert all(f"Table {t}" in md for t in ("I", "II", "III", "IV", "V", "VII", "X"))
    assert all(p[0].relative_to(report.out_dir).as_posix() in md for p in report.plots.values())


def test_html_can_link_images_instead_of_embedding(report):
    from diffmi_ray.reporting.html import img_tag

    png = report.plots["fig6a_change_rates"][0]
    assert img_tag(png, report.out_dir, "x", embed=False) == (
        '<img src="plots/fig6a_change_rates.png" data-file="plots/fig6a_change_rates.png" alt="x">')
    assert img_tag(png, report.out_dir, "x").startswith('<img src="data:image/png;base64,')


def test_a_grid_without_values_gives_a_report_that_says_why(tmp_path):
    header = (FIXTURE / "results.csv").read_text().splitlines()[0]
    (tmp_path / "results.csv").write_text(header + "\n")
    index = build_report(tmp_path)
    assert {"table_I", "table_X", "fig6a_change_rates", "acc_fid_scatter", "image_grids"} <= set(index.skipped)
    assert index.html.is_file() and "Not built" in index.markdown.read_text()


def test_fig6a_selected_layers_are_layer_numbers(results):
    from diffmi_ray.reporting.plots import selected_mask

    cr = results.change_rates("p0004")
    assert cr["selected"] == [2, 4, 8, 10, 12]  # the paper's Fig. 6a choice, 1-based
    mask = selected_mask(cr["layers"], cr["selected"])
    assert [layer for layer, m in zip(cr["layers"], mask) if m] == [2, 4, 8, 10, 12]


def test_sweep_plot_without_fid_has_no_empty_fid_axis(results, tmp_path, monkeypatch):
    """Offline runs have no FID: the sweep plot then says so instead of drawing an empty FID scale."""
    from diffmi_ray.reporting import plots as P

    titles, axes_on = [], []

    def spy(fig, stem):
        ax, ax2 = fig.axes
        titles.append(ax.get_title())
        axes_on.append(ax2.axison)
        return [stem]

    monkeypatch.setattr(P, "save", spy)
    labelled = label_points(results)
    assert P.plot_sweep(labelled, "k", tmp_path / "with")
    assert P.plot_sweep(labelled.assign(fid=float("nan")), "k", tmp_path / "without")
    assert axes_on == [True, False] and titles[1].endswith("(FID not computed)") and not titles[0].endswith(")")


def test_fig6a_ranks_layers_when_points_share_a_probe_but_not_a_selection(results, tmp_path, monkeypatch):
    """The Fig. 6b sweep: one probe, several L. Bars then carry their top-L rank, not one L's stars."""
    from diffmi_ray.reporting import plots as P

    labelled = label_points(results)
    rates = [0.1, 0.5, 0.3] + [0.0] * 10
    files = {}

    def fake(point):
        files.setdefault(point, {"layers": list(range(1, 14)), "change_rate": rates,
                                 "selected": [2] if not files else [2, 3]})
        return files[point]

    seen = {}

    def spy(fig, stem):
        ax = fig.axes[0]
        seen["title"] = ax.get_title()
        seen["texts"] = {t.get_text(): round(t.get_position()[0]) for t in ax.texts}
        return [stem]

    monkeypatch.setattr(results, "change_rates", fake)
    monkeypatch.setattr(P, "save", spy)
    assert P.plot_change_rates(results, labelled, tmp_path / "f")
    assert "top-L rank" in seen["title"]
    assert [seen["texts"][r] for r in ("1", "2", "3")] == [2, 3, 1]  # layer 2 (0.5), 3 (0.3), 1 (0.1)

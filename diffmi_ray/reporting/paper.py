"""The paper's reported numbers (package data) and the rule that joins them to ours.

Join rule (one place, tested):

* Every cell of one of our layout tables has a paper key
  ``(table, setting, public, private, target, method, metric)`` in the paper's spellings
  (see :mod:`diffmi_ray.reporting.names`; ``setting`` is the grid's setting label, except
  ``bido_defense`` for Diff-MI under BiDO in Table VII and the ``FT=..,PGD=..,Lcls=..`` flags in
  Table X, where ``method`` is ``Diff-MI``).
* **exact**: a paper row with the identical key exists -> ours, paper and ``diff = ours - paper``.
* **reference**: otherwise (e.g. CPU scale: ``mnist5k`` / ``small_cnn`` are not in the paper),
  every paper row with the same ``(table, setting, method, metric)`` is listed beside ours as the
  reference trend, with the paper's own datasets and target; ``diff`` is left empty, because numbers
  from another scale are not comparable and never pass or fail anything.
* Cells with neither are not listed.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pandas as pd

from diffmi_ray.reporting.names import DATASET_ORDER, METRIC_LABELS, TARGET_ORDER, order_key

#: The paper's Table N is ``paper_tables/table{N}.csv``; their roman numerals as used in the CSVs.
ROMAN: dict[int, str] = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII",
                         9: "IX", 10: "X"}
KEY: tuple[str, ...] = ("table", "setting", "public", "private", "target", "method", "metric")
COMPARISON_COLUMNS: tuple[str, ...] = (
    "table", "setting", "public", "private", "target", "method", "row", "point", "metric",
    "ours", "paper", "diff", "match", "paper_public", "paper_private", "paper_target",
)


@lru_cache(maxsize=1)
def _load() -> pd.DataFrame:
    root = resources.files("diffmi_ray") / "data" / "paper_tables"
    frames = []
    for n in ROMAN:
        with (root / f"table{n}.csv").open("r", encoding="utf-8") as f:
            frames.append(pd.read_csv(f, dtype={"value": float}, keep_default_na=False))
    df = pd.concat(frames, ignore_index=True)
    df = df.rename(columns={"public_dataset": "public", "private_dataset": "private", "target_model": "target"})
    for col in ("table", "setting", "public", "private", "target", "method", "metric", "unit"):
        df[col] = df[col].astype(object)
    return df


def paper_tables(table: str | None = None) -> pd.DataFrame:
    """The paper's numbers, long format.

    Columns: table (roman numeral), setting, public, private, target, method, metric, value
    (accuracies as fractions), unit. ``table`` filters to one table (e.g. ``"I"``).
    """
    df = _load()
    if table is not None:
        df = df[df["table"] == table]
    return df.copy()


def compare(ours: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Join our table cells to the paper's numbers by the rule in the module docstring.

    ours: cells with columns ``table, setting, public, private, target, method, row, point, metric,
        value`` (what :func:`diffmi_ray.reporting.tables.our_cells` returns).
    paper: the paper's cells (default: all paper tables).
    Returns one row per (our cell, paper row) with :data:`COMPARISON_COLUMNS`; ``match`` is
    ``exact`` or ``reference``.
    """
    if paper is None:
        paper = paper_tables()
    paper = paper[list(KEY) + ["value"]].rename(columns={"value": "paper"})
    cols = list(KEY) + ["row", "point", "value"]
    ours = ours[cols].rename(columns={"value": "ours"})
    if ours.empty:
        return pd.DataFrame(columns=list(COMPARISON_COLUMNS))

    exact = ours.merge(paper, on=list(KEY), how="inner")
    exact["match"] = "exact"
    exact["diff"] = exact["ours"] - exact["paper"]
    for c in ("public", "private", "target"):
        exact[f"paper_{c}"] = exact[c]

    matched = ours.merge(exact[list(KEY) + ["point", "row"]].drop_duplicates(), on=list(KEY) + ["point", "row"],
                         how="left", indicator=True)
    rest = ours[(matched["_merge"] == "left_only").to_numpy()]
    ref_key = ["table", "setting", "method", "metric"]
    ref = rest.merge(paper.rename(columns={"public": "paper_public", "private": "paper_private",
                                           "target": "paper_target"}), on=ref_key, how="inner")
    ref["match"] = "reference"
    ref["diff"] = float("nan")

    out = pd.concat([exact, ref], ignore_index=True)[list(COMPARISON_COLUMNS)]
    out["diff"] = out["diff"].astype(float).round(10)
    tables = {t: i for i, t in enumerate(ROMAN.values())}
    metrics = {m: i for i, m in enumerate(METRIC_LABELS)}
    keys = list(zip(out["table"].map(tables), out["match"], out["point"].astype(str), out["row"].astype(str),
                    out["metric"].map(lambda m: metrics.get(m, len(metrics))),
                    [order_key(str(v), DATASET_ORDER) for v in out["paper_public"]],
                    [order_key(str(v), TARGET_ORDER) for v in out["paper_target"]]))
    order = sorted(range(len(out)), key=keys.__getitem__)
    return out.iloc[order].reset_index(drop=True)

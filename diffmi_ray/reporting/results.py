"""Read a grid's saved results folder (no Ray, no torch): the only input of a report.

Layout read (written by the runner)::

    <results_dir>/results.csv                 one row per (point, class, metric)
    <results_dir>/missing.csv                 optional: point, metric, reason
    <results_dir>/grid.yaml                   copy of the grid file (shown, never parsed for values)
    <results_dir>/points/<point>/point.json   resolved config, descriptor columns, status
    <results_dir>/points/<point>/samples.npz  recon, recon_labels, private, private_labels (uint8 NHWC)
    <results_dir>/points/<point>/change_rates.json   Diff-MI with fine-tuning: layers, change_rate, selected
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from diffmi_ray.errors import UserError
from diffmi_ray.reporting.names import DESCRIPTORS, METRIC_LABELS, as_bool, is_missing

#: Columns of results.csv, in order.
RESULTS_COLUMNS: tuple[str, ...] = (
    "grid", "point", *DESCRIPTORS, "class", "metric", "value",
)
_NUMERIC = ("finetune_layers", "k", "alpha", "image_size")
_BOOLEAN = ("finetune", "pgd")


def resolve_results_dir(arg: str | Path) -> Path:
    """The results folder named by ``arg``; it must be a directory holding ``results.csv``.

    Raises :class:`~diffmi_ray.errors.UserError` otherwise (a grid YAML is resolved to its results
    folder by the CLI, not here).
    """
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such results directory")
    if not path.is_dir():
        raise UserError(
            f"{path}: expected a grid's results directory (the folder holding results.csv), got a file; "
            "a GRID.yaml argument is resolved to its results folder by `diffmi-ray report`")
    if not (path / "results.csv").is_file():
        raise UserError(f"{path}: no results.csv in this directory; run the grid first "
                        "(`diffmi-ray run GRID.yaml`) or point at <storage>/<grid_name>/")
    return path.resolve()


@dataclass
class Results:
    """A grid's results, as read from its folder.

    long: results.csv, typed (``class`` as str, ``value`` float, booleans as object True/False/None).
    points: one row per grid point (index ``point``): descriptor columns, ``status`` and the
        ``class == 'all'`` value of every metric as a column (NaN where missing; every metric of
        :data:`~diffmi_ray.reporting.names.METRIC_LABELS` has a column).
    metrics: the metrics that have at least one value.
    missing: missing.csv (columns point, metric, reason); empty if the file is absent.
    """

    root: Path
    long: pd.DataFrame
    points: pd.DataFrame
    missing: pd.DataFrame
    metrics: list[str] = field(default_factory=list)

    @property
    def grid_name(self) -> str:
        """The grid's name (from results.csv, else the folder name)."""
        names = self.long["grid"].dropna().unique() if "grid" in self.long else []
        return str(names[0]) if len(names) else self.root.name

    def point_dir(self, point: str) -> Path:
        return self.root / "points" / point

    def samples(self, point: str) -> dict[str, np.ndarray] | None:
        """The point's samples.npz arrays, or None if it has none."""
        path = self.point_dir(point) / "samples.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def change_rates(self, point: str) -> dict | None:
        """The point's change_rates.json (layers, change_rate, selected), or None."""
        path = self.point_dir(point) / "change_rates.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def grid_yaml(self) -> str | None:
        path = self.root / "grid.yaml"
        return path.read_text() if path.is_file() else None


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Typed copy: numbers as float, booleans as True/False/None, names as str ('' -> NaN)."""
    df = df.copy()
    for col in _NUMERIC:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in _BOOLEAN:
        if col in df:
            df[col] = pd.Series([as_bool(v) for v in df[col]], index=df.index, dtype=object)
    for col in ("grid", "point", "method", "setting", "public_dataset", "private_dataset",
                "target_model", "eval_model", "loss", "class", "metric"):
        if col in df:
            df[col] = pd.Series([None if is_missing(v) else str(v) for v in df[col]],
                                index=df.index, dtype=object)
    if "defense" in df:
        df["defense"] = pd.Series(["none" if is_missing(v) else str(v) for v in df["defense"]],
                                  index=df.index, dtype=object)
    return df


def _read_point_jsons(root: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((root / "points").glob("*/point.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from e
        row = {"point": data.get("point", path.parent.name), "status": data.get("status")}
        row.update({c: data.get(c) for c in ("grid", *DESCRIPTORS) if c in data})
        rows.append(row)
    return pd.DataFrame(rows)


def load_results(results_dir: str | Path) -> Results:
    """Read a results folder into :class:`Results` (see the module docstring for the layout)."""
    root = resolve_results_dir(results_dir)
    try:
        long = pd.read_csv(root / "results.csv", dtype={"class": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        long = pd.DataFrame(columns=list(RESULTS_COLUMNS))
    absent = [c for c in RESULTS_COLUMNS if c not in long.columns]
    if absent:
        raise UserError(f"{root / 'results.csv'}: missing column(s) {absent}; expected {list(RESULTS_COLUMNS)}")
    long = _normalise(long[list(RESULTS_COLUMNS)])
    long["value"] = pd.to_numeric(long["value"], errors="coerce").astype(float)

    # One row per point: descriptors from results.csv, completed by point.json (failed points).
    desc = long.drop_duplicates("point")[["point", "grid", *DESCRIPTORS]].set_index("point")
    pj = _read_point_jsons(root)
    if len(pj):
        pj = _normalise(pj).set_index("point")
        extra = pj.loc[~pj.index.isin(desc.index), [c for c in desc.columns if c in pj.columns]]
        desc = pd.concat([desc, extra]) if len(extra) else desc
        status = pj["status"].reindex(desc.index)
    else:
        status = pd.Series(None, index=desc.index, dtype=object)
    desc["status"] = [("unknown" if is_missing(s) else str(s)) for s in status]

    agg = long[long["class"] == "all"]
    values = agg.pivot_table(index="point", columns="metric", values="value", aggfunc="first")
    metrics = sorted(values.columns.tolist())
    points = desc.join(values, how="left").sort_index()
    for m in METRIC_LABELS:  # every known metric is a column, NaN where never computed
        if m not in points:
            points[m] = np.nan
    points.index.name = "point"

    missing_path = root / "missing.csv"
    if missing_path.is_file():
        missing = pd.read_csv(missing_path, dtype=str).fillna("")
    else:
        missing = pd.DataFrame(columns=["point", "metric", "reason"])
    return Results(root=root, long=long, points=points, missing=missing, metrics=metrics)

"""Reports: the paper's tables and figures regenerated from a grid's saved results, beside the
paper's own numbers.

Public API::

    from diffmi_ray.reporting import build_report, resolve_results_dir
    index = build_report(resolve_results_dir("results/quickstart"))   # -> ReportIndex
    index.html, index.tables["table_I"], index.plots["fig6b_finetune_layers"], index.skipped

Reads only the files the runner saved (results.csv, missing.csv, points/*/point.json,
samples.npz, change_rates.json, grid.yaml): no Ray, no torch, works on a copied folder.
See :mod:`diffmi_ray.reporting.build` for the report's files, :mod:`~diffmi_ray.reporting.tables`
for which points fill which table, and :mod:`~diffmi_ray.reporting.paper` for the rule joining
our numbers to the paper's.
"""

from diffmi_ray.reporting.build import ReportIndex, build_report
from diffmi_ray.reporting.paper import compare, paper_tables
from diffmi_ray.reporting.results import Results, load_results, resolve_results_dir
from diffmi_ray.reporting.tables import TABLES, LayoutTable, TableSpec

__all__ = [
    "build_report", "resolve_results_dir", "ReportIndex", "load_results", "Results", "paper_tables", "compare",
    "TABLES", "TableSpec", "LayoutTable",
]

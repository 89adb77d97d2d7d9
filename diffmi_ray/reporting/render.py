"""Text renderings of layout tables: Markdown, CSV, LaTeX (booktabs) and HTML.

Best values are **bold** in Markdown, ``\\textbf`` in LaTeX, ``<b class="best">`` in HTML and carry
a trailing ``*`` in CSV. Cells print with :func:`~diffmi_ray.reporting.names.format_value`.
"""

from __future__ import annotations

import html
import io

import pandas as pd

from diffmi_ray.reporting.names import format_value, metric_header
from diffmi_ray.reporting.tables import LayoutTable


def _metric_of(col) -> str:
    return col[-1] if isinstance(col, tuple) else col


def _header(col, sep: str = ": ") -> str:
    if isinstance(col, tuple):
        return f"{col[0]}{sep}{metric_header(col[1])}"
    return metric_header(col)


def _row_parts(idx) -> tuple[str, str]:
    return (idx[0], idx[1]) if isinstance(idx, tuple) else ("", idx)


def cell_texts(t: LayoutTable, wrap, plain=lambda s: s) -> list[list[str]]:
    """Printed cells of ``t``, row by row: ``wrap(text)`` for best values, ``plain(text)`` otherwise."""
    values = t.frame.to_numpy(dtype=float)
    best = t.best.to_numpy(dtype=bool)
    metrics = [_metric_of(c) for c in t.frame.columns]
    return [[wrap(format_value(m, v)) if b else plain(format_value(m, v))
             for m, v, b in zip(metrics, vrow, brow)] for vrow, brow in zip(values, best)]


def _has_row_groups(t: LayoutTable) -> bool:
    return isinstance(t.frame.index, pd.MultiIndex)


# -------------------------------------------------------------------------------------- markdown


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub pipe table."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(t: LayoutTable) -> str:
    """The table as Markdown: caption line, then a pipe table (best values in bold)."""
    group_head = ["Group"] if _has_row_groups(t) else []
    header = group_head + ["Method" if t.spec.rows_from == "method" else "Setting"]
    header += [_header(c) for c in t.frame.columns]
    rows = []
    for idx, texts in zip(t.frame.index, cell_texts(t, lambda s: f"**{s}**")):
        g, r = _row_parts(idx)
        rows.append(([g] if group_head else []) + [r] + texts)
    return f"**{t.caption}**\n\n" + markdown_table(header, rows) + "\n"


def frame_to_markdown(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    """Any small DataFrame as a pipe table (floats with ``floatfmt``, NaN as ``–``)."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "–" if pd.isna(v) else floatfmt.format(v)
        return "–" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)

    return markdown_table([str(c) for c in df.columns], [[fmt(v) for v in row] for row in df.itertuples(index=False)])


# ------------------------------------------------------------------------------------------- csv


def to_csv(t: LayoutTable) -> str:
    """The layout as CSV: one header row (``group: metric``), printed values, best marked ``*``."""
    out = pd.DataFrame(index=range(len(t.frame.index)))
    if _has_row_groups(t):
        out["group"] = [i[0] for i in t.frame.index]
    out["method" if t.spec.rows_from == "method" else "setting"] = [_row_parts(i)[1] for i in t.frame.index]
    texts = cell_texts(t, lambda s: s + "*")
    for j, c in enumerate(t.frame.columns):
        out[_header(c)] = [row[j] for row in texts]
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- latex

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "→": r"$\rightarrow$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "·": r"$\cdot$", "α": r"$\alpha$",
        "–": "--", "−": "$-$"}


def tex_escape(s: str) -> str:
    """Escape LaTeX specials (and map →, ·, α, – to math / dashes)."""
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(t: LayoutTable) -> str:
    """A booktabs ``table`` environment; column groups as ``\\multicolumn`` with ``\\cmidrule``."""
    cols = list(t.frame.columns)
    grouped_cols = isinstance(t.frame.columns, pd.MultiIndex)
    lead = 2 if _has_row_groups(t) else 1
    spec = "l" * lead + "r" * len(cols)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(t.caption)}}}", rf"\label{{tab:{t.name}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if grouped_cols:
        groups: list[tuple[str, int]] = []
        for g, _ in cols:
            if groups and groups[-1][0] == g:
                groups[-1] = (g, groups[-1][1] + 1)
            else:
                groups.append((g, 1))
        head = [""] * lead + [rf"\multicolumn{{{n}}}{{c}}{{{tex_escape(g)}}}" for g, n in groups]
        lines.append(" & ".join(head) + r" \\")
        start, rules = lead + 1, []
        for _, n in groups:
            rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
            start += n
        lines.append(" ".join(rules))
    first = (["Group"] if lead == 2 else []) + ["Method" if t.spec.rows_from == "method" else "Setting"]
    lines.append(" & ".join(first + [tex_escape(metric_header(_metric_of(c))) for c in cols]) + r" \\")
    lines.append(r"\midrule")
    prev = None
    for idx, vals in zip(t.frame.index, cell_texts(t, lambda s: rf"\textbf{{{tex_escape(s)}}}", tex_escape)):
        g, r = _row_parts(idx)
        if lead == 2 and prev is not None and g != prev:
            lines.append(r"\midrule")
        lead_cells = ([tex_escape(g) if g != prev else ""] if lead == 2 else []) + [tex_escape(r)]
        prev = g
        lines.append(" & ".join(lead_cells + vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def frame_to_latex(df: pd.DataFrame, caption: str, label: str, floatfmt: str = "{:.4f}") -> str:
    """Any DataFrame as a booktabs ``longtable`` (it may span pages; needs ``\\usepackage{longtable}``)."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "--" if pd.isna(v) else floatfmt.format(v)
        return "--" if v is None or (not isinstance(v, str) and pd.isna(v)) else tex_escape(v)

    head = " & ".join(tex_escape(c) for c in df.columns) + r" \\"
    lines = [rf"\begin{{longtable}}{{{'l' * len(df.columns)}}}",
             rf"\caption{{{tex_escape(caption)}}}\label{{tab:{label}}} \\", r"\toprule", head, r"\midrule",
             r"\endfirsthead", r"\toprule", head, r"\midrule", r"\endhead", r"\bottomrule", r"\endfoot"]
    lines += [" & ".join(fmt(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines.append(r"\end{longtable}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ html


def to_html(t: LayoutTable) -> str:
    """An HTML ``<table>`` (column groups as spanning headers, best values ``<b class="best">``)."""
    shown = pd.DataFrame(cell_texts(t, lambda s: f'<b class="best">{html.escape(s)}</b>', html.escape),
                         index=t.frame.index, columns=t.frame.columns, dtype=object)
    if isinstance(shown.columns, pd.MultiIndex):
        shown.columns = pd.MultiIndex.from_tuples([(html.escape(g), html.escape(metric_header(m)))
                                                   for g, m in shown.columns])
    else:
        shown.columns = [html.escape(metric_header(m)) for m in shown.columns]
    if isinstance(shown.index, pd.MultiIndex):
        shown.index = pd.MultiIndex.from_tuples([(html.escape(g), html.escape(r)) for g, r in shown.index])
    else:
        shown.index = [html.escape(r) for r in shown.index]
    body = shown.to_html(escape=False, na_rep="–", border=0, classes="layout")
    return f'<figure class="table" id="{t.name}"><figcaption>{html.escape(t.caption)}</figcaption>{body}</figure>'


def frame_to_html(df: pd.DataFrame, table_id: str, floatfmt: str = "{:.4f}") -> str:
    """Any small DataFrame as an HTML table with an id."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return "–" if pd.isna(v) else floatfmt.format(v)
        return "–" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)

    shown = df.map(fmt) if len(df) else df
    return shown.to_html(index=False, border=0, classes="plain", table_id=table_id, escape=True)

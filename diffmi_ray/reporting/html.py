"""The single static ``report.html``: every table, plot and image grid of one grid's results.

Self-contained by default: images are embedded as base64 ``data:`` URIs (``embed_images=False``
references them relatively instead); each ``<img>`` carries ``data-file`` with its path relative to
the report folder, and each table an ``id`` (``table_I``, ``table_I_paper``, ``paper_comparison``).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 14px 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; text-align: center; }
tbody th { text-align: left; background: #fafafa; }
b.best { color: #0a5; }
figure { margin: 10px 0 18px 0; } figcaption { font-size: 13px; font-weight: 600; margin-bottom: 4px; }
figure.plot img, figure.grid img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 12px; } .pair { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
nav a { margin-right: 12px; } pre { background: #f7f7f7; padding: 8px; font-size: 11px; overflow-x: auto; }
td.left, table.plain td { text-align: left; }
"""


@dataclass
class Section:
    """A titled block of pre-rendered HTML."""

    id: str
    title: str
    body: str


def img_tag(path: Path, root: Path, alt: str, embed: bool = True) -> str:
    """``<img>`` for ``path`` (relative to ``root`` in ``data-file``), embedded as base64 if ``embed``."""
    rel = path.relative_to(root).as_posix()
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    else:
        src = html.escape(rel)
    return f'<img src="{src}" data-file="{html.escape(rel)}" alt="{html.escape(alt)}">'


def figure(path: Path, root: Path, caption: str, cls: str = "plot", embed: bool = True,
           extra_links: list[Path] = ()) -> str:
    """A captioned figure, with links to the other formats (e.g. the PDF) of the same figure."""
    links = " ".join(f'<a href="{html.escape(p.relative_to(root).as_posix())}">{p.suffix[1:].upper()}</a>'
                     for p in extra_links)
    return (f'<figure class="{cls}"><figcaption>{html.escape(caption)} '
            f'<span class="note">{links}</span></figcaption>{img_tag(path, root, caption, embed)}</figure>')


def page(title: str, intro: str, sections: list[Section]) -> str:
    """The whole document."""
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{intro}\n<nav>{nav}</nav>\n{body}\n</body></html>\n")

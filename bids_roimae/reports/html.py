"""Self-contained HTML pages: tables, embedded figures and the page frame.

Figures are embedded as base64 ``data:`` URIs, so a report opens offline with no external
CSS, JavaScript or image files.
"""

from __future__ import annotations

import base64
import html
from string import Template
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from bids_roimae.reports.figures import bar_png

_PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>$title</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4}
h1{border-bottom:2px solid #446;padding-bottom:.2em}h2{color:#446;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#eef}td:nth-child(-n+3){text-align:left}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%}.meta{font-size:.85em;color:#555}
.warning{background:#fde8e8;border-left:4px solid #c00;padding:.5em .8em}
</style></head><body>
<h1>$title</h1>
<p class="meta">$subtitle</p>
$body
</body></html>
""")



def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding PNG bytes in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_table(table: pd.DataFrame, *, max_rows: int = 40, digits: int = 4) -> str:
    """An escaped HTML table of the first ``max_rows`` rows."""
    shown = table.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for _, row in shown.iterrows():
        cells = []
        for v in row:
            if isinstance(v, (float, np.floating)):
                text = "n/a" if not np.isfinite(v) else f"{v:.{digits}g}"
            else:
                text = "n/a" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (f"<p class='meta'>{len(table) - max_rows} more rows in the TSV file.</p>"
            if len(table) > max_rows else "")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def figure_html(png: bytes, caption: str) -> str:
    """An embedded figure with its caption."""
    return (f"<figure><img alt='{html.escape(caption, quote=True)}' src='{data_uri(png)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """A complete HTML document; ``sections`` are ``(heading, inner HTML)`` pairs."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{inner}" for h, inner in sections)
    return _PAGE.substitute(title=html.escape(title), subtitle=html.escape(subtitle),
                            body=body)


def ranking_section(table: pd.DataFrame, value: str, title: str, label: str = "name",
                    error: Optional[str] = "sd") -> str:
    """A bar chart of ``value`` and the table itself."""
    png = bar_png(table, value=value, label=label, error=error, title=title)
    return figure_html(png, title) + html_table(table)

"""Figures and self-contained HTML for the attribution reports (and the participant page).

Every figure is rendered with matplotlib's Agg backend (no display needed) into PNG bytes
and embedded in the HTML page as a base64 ``data:`` URI, so a report opens offline with
no external CSS, JavaScript or image files.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from string import Template
from typing import Optional, Sequence

import numpy as np
import pandas as pd

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
</style></head><body>
<h1>$title</h1>
<p class="meta">$subtitle</p>
$body
</body></html>
""")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; called before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding PNG bytes in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def brain_png(img, *, title: str, bg_img=None, kind: str = "glass",
              symmetric: bool = False) -> bytes:
    """A map as a glass brain or as orthogonal slices over an anatomical background.

    Parameters
    ----------
    img : nibabel image
        3D map.
    title : str
    bg_img : nibabel image or path, optional
        Background (the template T1w) for ``kind="stat"``.
    kind : {"glass", "stat"}
    symmetric : bool
        Signed map: a diverging colour scale centred at 0.
    """
    plt = _pyplot()
    from nilearn import plotting

    data = np.asarray(img.dataobj, dtype=np.float64)
    finite = data[np.isfinite(data) & (data != 0)]
    vmax = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    fig = plt.figure(figsize=(8, 3))
    common = dict(figure=fig, title=title, colorbar=True, vmax=vmax)
    if kind == "glass":
        plotting.plot_glass_brain(img, plot_abs=not symmetric, symmetric_cbar=symmetric,
                                  cmap="RdBu_r" if symmetric else "hot", **common)
    else:
        plotting.plot_stat_map(img, bg_img=bg_img if bg_img is not None else False,
                               symmetric_cbar=symmetric, draw_cross=False,
                               cmap="RdBu_r" if symmetric else "hot", **common)
    return _png(fig)


def bar_png(table: pd.DataFrame, *, value: str, label: str = "name",
            error: Optional[str] = None, title: str = "", top: int = 20,
            color_by: Optional[str] = "system") -> bytes:
    """Horizontal bar chart of the ``top`` rows with the largest ``value``."""
    plt = _pyplot()
    rows = table.dropna(subset=[value]).sort_values(value, ascending=False).head(top)
    rows = rows.iloc[::-1]  # largest at the top
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    colors = None
    if color_by and color_by in rows:
        groups = sorted(set(map(str, table[color_by])))
        cmap = plt.get_cmap("tab20")
        lut = {g: cmap(i % 20) for i, g in enumerate(groups)}
        colors = [lut[str(g)] for g in rows[color_by]]
    xerr = rows[error].to_numpy() if error and error in rows else None
    ax.barh(np.arange(len(rows)), rows[value].to_numpy(), xerr=xerr, color=colors)
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels([str(v) for v in rows[label]], fontsize=8)
    ax.set_xlabel(value)
    ax.set_title(title, fontsize=10)
    return _png(fig)


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


# -- pages -----------------------------------------------------------------------------
def ranking_section(table: pd.DataFrame, value: str, title: str, label: str = "name",
                    error: Optional[str] = "sd") -> str:
    """A bar chart of ``value`` and the table itself."""
    png = bar_png(table, value=value, label=label, error=error, title=title)
    return figure_html(png, title) + html_table(table)


def build_participant_report(output_dir, subject: str, *, template=None) -> Path:
    """``OUTPUT_DIR/sub-<label>.html``: every run's maps, region rankings and fidelity."""
    import json

    import nibabel as nib

    from bids_roimae.io.derivatives import write_text
    from bids_roimae.reports.run_derivatives import find_outputs

    label = str(subject).removeprefix("sub-")
    sections = []
    for ents, path in find_outputs(output_dir, stat="ig", suffix="boldmap", desc="absmean",
                                   extension=".nii.gz", subjects=[label]):
        run = path.name.split("_space-")[0]
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        img = nib.load(str(path))
        inner = [f"<p class='meta'>steps {meta.get('Steps')}, baseline "
                 f"{meta.get('Baseline')}, windows {meta.get('NumberOfWindows')}, "
                 f"completeness error {meta.get('CompletenessMaxRelativeError', 0):.2%}</p>",
                 figure_html(brain_png(img, title="mean |IG|"), "Mean |attribution|")]
        if template is not None and template.t1w_path is not None:
            inner.append(figure_html(brain_png(img, title="mean |IG|", kind="stat",
                                               bg_img=str(template.t1w_path)),
                                     "Mean |attribution| on the template T1w"))
        sections.append((f"{run}: prediction attribution", "".join(inner)))
    for stat, value, title in (("ig", "mean_abs", "regions by mean |IG|"),
                               ("fidelity", "embedding_shift",
                                "regions by embedding shift when hidden")):
        for ents, path in find_outputs(output_dir, stat=stat, suffix="bold",
                                       subjects=[label]):
            table = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
            table = table.sort_values(value, ascending=False, ignore_index=True)
            run = path.name.split("_space-")[0]
            sections.append((f"{run}: {title}",
                             ranking_section(table, value, title, error=None)))
    if not sections:
        sections.append(("No outputs", f"<p>No attribution outputs for sub-{label}.</p>"))
    page = html_page(f"sub-{label}: region attribution", sections,
                     subtitle="bids_roimae participant report")
    path = Path(output_dir) / f"sub-{label}.html"
    return write_text(path, page)


__all__ = ["bar_png", "brain_png", "build_participant_report", "data_uri", "figure_html",
           "html_page", "html_table", "ranking_section"]

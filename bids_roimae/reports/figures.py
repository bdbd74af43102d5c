"""Figures of the reports: brain maps and bar charts rendered to PNG bytes.

Every figure is drawn with matplotlib's Agg backend (no display needed); the HTML pages
embed the bytes (:mod:`bids_roimae.reports.html`).
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pandas as pd


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

"""The participant page ``OUTPUT_DIR/sub-<label>.html``, as fMRIPrep writes one."""

from __future__ import annotations

import html
import json
from pathlib import Path

import nibabel as nib
import pandas as pd

from bids_roimae.io.derivatives import write_text
from bids_roimae.reports.figures import brain_png
from bids_roimae.reports.html import figure_html, html_page, ranking_section
from bids_roimae.reports.run_derivatives import find_outputs


def _evidence_html(meta: dict) -> str:
    """The classifier's out-of-fold line, the chance warning and which model attributed
    this participant, from an IG sidecar."""
    source = (meta.get("Model") or {}).get("AttributionModel") or {}
    text = f"<p><b>{html.escape(str(meta.get('ClassifierOutOfFold', 'not available')))}</b></p>"
    if meta.get("Warning"):
        text += f"<p class='warning'><b>Warning:</b> {html.escape(meta['Warning'])}</p>"
    if source:
        text += (f"<p class='meta'>Attributed by: {html.escape(str(source.get('Source')))}"
                 f" (trained on this participant: "
                 f"{html.escape(str(source.get('TrainedOnThisParticipant')))})</p>")
    return text


def build_participant_report(output_dir, subject: str, *, template=None) -> Path:
    """``OUTPUT_DIR/sub-<label>.html``: every run's maps, region rankings and fidelity."""
    label = str(subject).removeprefix("sub-")
    sections = []
    for ents, path in find_outputs(output_dir, stat="ig", suffix="boldmap", desc="absmean",
                                   extension=".nii.gz", subjects=[label]):
        run = path.name.split("_space-")[0]
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        if not sections:  # the page opens with whether the classifier is any good
            sections.append(("Classifier out of fold", _evidence_html(meta)))
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

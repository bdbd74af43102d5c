"""The group report (``group --mode report``): tables, maps and ``group_report.html``.

Reads the per-run region tables and maps that ``participant --mode predict`` wrote
(:mod:`bids_roimae.reports.run_derivatives`) and writes, under ``OUTPUT_DIR/group/``::

    seg-<Atlas>_stat-<ig|fidelity>_desc-<regions|systems>_stats.tsv      rankings
    seg-<Atlas>_stat-<ig|fidelity>_desc-[error][system]groupdiff_stats.tsv    group tests
    space-<S>[_seg-<Atlas>]_res-<R>_stat-<...>_desc-<mean|sd|...>_boldmap.nii.gz   group maps
    space-<S>_seg-<Atlas>_res-<R>_stat-<...>_desc-<groupdiff|...>_boldmap.nii.gz  t per region
    group_report.html

each table and image with a JSON sidecar. The statistics are
:mod:`bids_roimae.analysis.group_stats`.
"""

from __future__ import annotations

import logging
from html import escape as html_escape
from pathlib import Path
from typing import Iterable, Optional

import nibabel as nib
import numpy as np
import pandas as pd

from bids_roimae.analysis.evaluation import CHANCE_WARNING, OutOfFoldSummary, evidence_sidecar
from bids_roimae.analysis.group_stats import (
    adjusted_group_difference,
    group_difference,
    randomisation_check,
    region_ranking,
    system_ranking,
    system_tables,
)
from bids_roimae.analysis.regions import paint_regions, to_source_grid
from bids_roimae.io.atlas import Atlas, resample_labels
from bids_roimae.io.bids_names import group_path
from bids_roimae.io.derivatives import save_image, write_sidecar, write_text, write_tsv
from bids_roimae.io.templates import Template
from bids_roimae.reports.figures import brain_png
from bids_roimae.reports.html import figure_html, html_page, html_table, ranking_section
from bids_roimae.reports.run_derivatives import find_outputs, read_region_tables

logger = logging.getLogger(__name__)


def _top_differences_html(differences, html_table, n_top: int = 5) -> str:
    """The ``n_top`` regions of every group-difference table, side by side in one table."""
    rows = []
    for measure, diff in differences:
        cols = [c for c in ("name", "system", "statistic", "cohen_d", "partial_eta2", "p",
                            "q", "rank", "check") if c in diff]
        rows.append(diff.head(n_top)[cols].assign(measure=measure))
    table = pd.concat(rows, ignore_index=True)
    test = differences[0][1]["test"].iloc[0] if "test" in differences[0][1] else ""
    return (f"<p class='meta'>Regions ranked by p ({test}); every table in full below. "
            "Uncorrected p over many regions: read q (Benjamini-Hochberg).</p>"
            + html_table(table[["measure"] + [c for c in table if c != "measure"]]))


#: IG measures compared between groups: (region-table column, desc of the outputs).
IG_MEASURES = (("mean_abs", "groupdiff"), ("relative_mean_abs", "relativegroupdiff"),
               ("scaled_mean_abs", "scaledgroupdiff"),
               ("random_mean_abs", "randomgroupdiff"),
               ("random_scaled_mean_abs", "randomscaledgroupdiff"))
#: Region rankings of IG with the amplitude taken out: (column, desc, title).
AMPLITUDE_CONTROLLED = (
    ("relative_mean_abs", "relativeregions", "attribution relative to a randomised head"),
    ("scaled_mean_abs", "scaledregions", "attribution per unit of input scale"))
#: Trained-model measures checked against their randomised-head twin: (column, desc).
RANDOMISATION_CHECKS = (("mean_abs", "randomcheck"), ("scaled_mean_abs", "scaledrandomcheck"))


def _difference(tables, column, groups, covariates):
    """Welch (or ANOVA) per region, or the covariate-adjusted linear model."""
    if covariates is None:
        return group_difference(tables, column, groups)
    return adjusted_group_difference(tables, column, groups, covariates)


def _write_stats(path: Path, table: pd.DataFrame, opening: dict) -> Path:
    """A group table whose sidecar opens with ``opening`` (for attribution tables, the
    classifier's out-of-fold performance) and then names its columns."""
    write_tsv(path, table)
    write_sidecar(path, {**opening, **{c: {"Description": c} for c in table.columns}})
    return path


def _evidence_html(evidence: Optional[OutOfFoldSummary]) -> str:
    if evidence is None:
        return ("<p class='warning'><b>No out-of-fold evaluation is stored with the model "
                "(not a binary target, or an older model)</b>: nothing here says whether "
                "the classifier predicts the diagnosis, so its attributions are not "
                "evidence of what drives it.</p>")
    text = f"<p><b>{html_escape(evidence.headline())}</b></p>"
    if not evidence.above_chance:
        text += f"<p class='warning'><b>Warning:</b> {html_escape(CHANCE_WARNING)}</p>"
    return text


def _checks_html(checks) -> str:
    parts = ["<p class='meta'>Group differences of attributions from the trained "
             "classifier beside those of the same classifier with a randomised head "
             "(Adebayo et al. 2018). <b>survives</b>: significant (q &lt; 0.05) for the "
             "trained model only; <b>amplitude</b>: the randomised model shows it too "
             "(p &lt; 0.05), so it comes from the input (e.g. a group's larger fluctuation), "
             "not from what the model learned.</p>"]
    for column, check in checks:
        flagged = check[check["check"] != "none"]
        parts.append(f"<p>{column}: {int((check['check'] == 'survives').sum())} regions "
                     f"survive, {int((check['check'] == 'amplitude').sum())} are "
                     f"amplitude</p>" + html_table(flagged if len(flagged) else check.head(5),
                                                   max_rows=20))
    return "".join(parts)


def _template_labels(output_dir, atlas_name: str, atlas_table: pd.DataFrame,
                     atlas_img, template):
    """Atlas labels on the template grid: from ``atlas_img`` when the caller has it, else
    the ``dseg`` the pretraining wrote into the dataset; ``False`` when neither exists."""
    source = "caller"
    if atlas_img is None:
        found = sorted(Path(output_dir).glob(f"space-{template.space}_atlas-{atlas_name}_"
                                             "*dseg.nii.gz"))
        if not found:
            logger.warning("no %s label image in %s: group difference maps skipped",
                           atlas_name, output_dir)
            return False
        atlas_img, source = nib.load(str(found[0])), str(found[0])
    atlas = Atlas(atlas_name, None, atlas_img, atlas_table, source)
    return resample_labels(atlas, template.mask_img)[0]


def region_value_image(labels: np.ndarray, mask: np.ndarray, affine, indices, values):
    """A 3D image painting every atlas region with its value (0 outside the regions).

    Parameters
    ----------
    labels : ndarray of int, shape (X, Y, Z)
        Atlas labels on the target grid.
    mask : ndarray of bool, shape (X, Y, Z)
        Template brain; voxels outside are 0.
    affine : ndarray, shape (4, 4)
    indices, values : sequences
        Region labels and their values (NaN values paint 0).
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))  # an infinite t stays big
    scores = dict(zip(np.asarray(indices, dtype=np.int64).tolist(), values.tolist()))
    return nib.Nifti1Image(paint_regions(labels, mask, scores), affine)


def mean_sd_maps(paths_by_subject: dict, target_img):
    """Group mean and SD maps on the template grid.

    Each participant's runs are averaged first; maps on another grid are resampled.

    Parameters
    ----------
    paths_by_subject : dict of str -> list of paths
    target_img : nibabel image
        The template brain mask (grid, affine; voxels outside it are 0).

    Returns
    -------
    (mean_img, sd_img) : nibabel images
    """
    mask = np.asarray(target_img.dataobj) > 0
    per_subject = []
    for paths in paths_by_subject.values():
        runs = [np.asarray(to_source_grid(nib.load(str(p)), target_img).dataobj)
                for p in paths]
        per_subject.append(np.mean(runs, axis=0))
    stack = np.stack(per_subject)
    mean = np.where(mask, stack.mean(0), 0).astype(np.float32)
    sd = stack.std(0, ddof=1) if len(stack) > 1 else np.zeros_like(mean)
    sd = np.where(mask, sd, 0).astype(np.float32)
    return nib.Nifti1Image(mean, target_img.affine), nib.Nifti1Image(sd, target_img.affine)


def build_group_report(output_dir, participants: Optional[pd.DataFrame], atlas_name: str,
                       atlas_table: pd.DataFrame, template: Template, *, atlas_img=None,
                       label_column: Optional[str] = None,
                       subjects: Optional[Iterable[str]] = None,
                       evidence: Optional[OutOfFoldSummary] = None,
                       covariates: Optional[pd.DataFrame] = None) -> dict:
    """Group summary of attribution and fidelity outputs (``group --mode report``).

    Reads the per-run region tables and maps written by ``participant --mode predict``;
    writes to ``OUTPUT_DIR/group/``: mean and SD maps on the template grid, region and
    system rankings, group differences by region (tables and t maps) and by system when
    ``label_column`` has groups, the masking comparison tables
    ``models/*/*comparison*.tsv`` when present, and ``group_report.html``.

    Parameters
    ----------
    output_dir : path
    participants : DataFrame or None
        ``participants.tsv`` indexed by label without ``sub-``.
    atlas_name : str
        The ``seg-`` entity of the outputs.
    atlas_table : DataFrame
        Region ``index``, ``name``, ``system``.
    template : Template
        Grid of the group maps (``mask_img``) and background (``t1w_path``).
    atlas_img : nibabel image, optional
        Atlas labels (any grid); default: the ``dseg`` image in OUTPUT_DIR.
    label_column : str, optional
        Diagnostic group column of ``participants``.
    subjects : iterable of str, optional
        Restrict to these participants.
    evidence : OutOfFoldSummary, optional
        The classifier's out-of-fold performance: the report opens with it, and with a
        warning when the AUC interval includes 0.5.
    covariates : DataFrame, optional
        Per participant (index: label without ``sub-``), complete: group differences come
        from region-wise linear models with these covariates instead of Welch t-tests.

    Returns
    -------
    dict
        Paths written, keyed by what they hold; ``"html"`` is the report.
    """
    out, seg = {}, atlas_name
    sections, differences, figures, checks, labels = [], [], [], [], None
    opening = {"ig": evidence_sidecar(evidence), "fidelity": {}}
    res = getattr(template, "resolution", None)
    brain = np.asarray(template.mask_img.dataobj) > 0
    bg = str(template.t1w_path) if template.t1w_path is not None else None
    groups = None
    if participants is not None and label_column and label_column in participants:
        groups = participants[label_column]
        groups.index = groups.index.astype(str).str.removeprefix("sub-")
    for stat, value, map_desc in (("ig", "mean_abs", "absmean"),
                                  ("fidelity", "embedding_shift", "shift")):
        tables = read_region_tables(output_dir, stat, subjects)
        if tables.empty:
            continue
        n_sub = tables["subject"].nunique()
        ranking = region_ranking(tables, value)
        if stat == "fidelity":
            err = region_ranking(tables, "error").set_index("index")
            ranking["error_mean"] = ranking["index"].map(err["mean"])
            ranking["error_sd"] = ranking["index"].map(err["sd"])
        systems = system_ranking(tables, value)
        for key, table in (("regions", ranking), ("systems", systems)):
            path = group_path(output_dir, suffix="stats", extension=".tsv", seg=seg, stat=stat,
                              desc=key)
            out[f"{stat}_{key}"] = _write_stats(path, table,
                                                opening[stat])
        inner = [f"<p class='meta'>{n_sub} participants, {len(tables)} region rows.</p>"]
        maps = {}
        for ents, path in find_outputs(output_dir, stat=stat, suffix="boldmap",
                                       desc=map_desc, extension=".nii.gz", subjects=subjects):
            maps.setdefault(ents["sub"], []).append(path)
        if maps:
            mean_img, sd_img = mean_sd_maps(maps, template.mask_img)
            for what, img in (("mean", mean_img), ("sd", sd_img)):
                desc = what if stat == "ig" else f"{map_desc}{what}"
                path = group_path(output_dir, suffix="boldmap", extension=".nii.gz",
                                  space=template.space, res=res,
                                  seg=None if stat == "ig" else seg, stat=stat, desc=desc)
                out[f"{stat}_{what}_map"] = save_image(img, path, {
                    "Description": f"Group {what} over participants of {stat} {map_desc} maps",
                    "NumberOfParticipants": len(maps), "Atlas": seg,
                    "Sources": sorted(str(p.relative_to(output_dir))
                                      for ps in maps.values() for p in ps)})
            inner.append(figure_html(brain_png(mean_img, title=f"group mean {stat}"),
                                     f"Group mean {stat} map (glass brain)"))
            inner.append(figure_html(brain_png(mean_img, title=f"group mean {stat}",
                                               kind="stat", bg_img=bg),
                                     f"Group mean {stat} map on the template"))
        sections.append((f"{stat}: regions", "".join(inner) + ranking_section(
            ranking, "mean", f"{stat}: regions by group mean {value}")))
        sections.append((f"{stat}: systems", ranking_section(
            systems, "mean", f"{stat}: systems by group mean {value}", label="system")))
        for column, desc, title in AMPLITUDE_CONTROLLED if stat == "ig" else ():
            if column not in tables:
                continue
            controlled = region_ranking(tables, column)
            path = group_path(output_dir, suffix="stats", extension=".tsv", seg=seg,
                              stat=stat, desc=desc)
            out[f"ig_{desc}"] = _write_stats(path, controlled, opening[stat])
            sections.append((f"ig: regions by {title}", ranking_section(
                controlled, "mean", f"ig: regions by group mean {column}")))
        # Fidelity also compares the reconstruction error (a region that decouples from its
        # network, or fluctuates more, is rebuilt worse from its context), relative to
        # each window's mean over regions: what differs is the region, not how
        # predictable a participant's data are as a whole.
        error = "error_relative" if "error_relative" in tables else "error"
        if stat == "fidelity":
            compared = [(value, "groupdiff"), (error, "errorgroupdiff")]
        else:
            compared = [(c, d) for c, d in IG_MEASURES if c in tables]
        stat_diffs = {}
        for column, desc in compared if groups is not None else []:
            diff = _difference(tables, column, groups, covariates)
            if diff is None:
                continue
            stat_diffs[column] = diff
            path = group_path(output_dir, suffix="stats", extension=".tsv", seg=seg, stat=stat,
                              desc=desc)
            out[f"{stat}_{desc}"] = _write_stats(path, diff, opening[stat])
            if not column.startswith("random_"):
                differences.append((f"{stat} {column}", diff))
            if labels is None:
                labels = _template_labels(output_dir, atlas_name, atlas_table, atlas_img,
                                          template)
            if labels is False:
                img = None
            else:
                img = region_value_image(labels, brain, template.mask_img.affine,
                                         diff["index"], diff["statistic"])
                path = group_path(output_dir, suffix="boldmap", extension=".nii.gz",
                                  space=template.space, res=res, seg=seg, stat=stat,
                                  desc=desc)
                source = Path(out[f"{stat}_{desc}"]).relative_to(Path(output_dir))
                out[f"{stat}_{desc}_map"] = save_image(img, path, {
                    "Description": f"Each {seg} region painted with the group "
                                   f"difference statistic of {stat} {column}",
                    "Test": str(diff["test"].iloc[0]), "Atlas": seg,
                    "Sources": [str(source)]})
            if img is not None and desc == "groupdiff" and stat == "ig":
                figures.append(figure_html(
                    brain_png(img, title=f"{stat} {column}: t", kind="stat", bg_img=bg,
                              symmetric=True),
                    f"Group difference statistic per region, {diff['test'].iloc[0]}"))
            sections.append((f"{stat}: {label_column} group differences in {column}",
                             html_table(diff)))
            if column.startswith("random_"):
                continue
            # The same by system (limbic, cerebellum, ...): mean over its regions.
            sys_diff = _difference(system_tables(tables, column), column, groups, covariates)
            if sys_diff is not None:
                sys_diff = sys_diff.drop(columns=["index", "name"])
                sys_desc = desc.replace("groupdiff", "systemgroupdiff")
                path = group_path(output_dir, suffix="stats", extension=".tsv", seg=seg,
                                  stat=stat, desc=sys_desc)
                out[f"{stat}_{sys_desc}"] = _write_stats(path, sys_diff,
                                                         opening[stat])
                differences.append((f"{stat} {column} by system", sys_diff))
                sections.append((f"{stat}: {label_column} group differences in {column} "
                                 "by system", html_table(sys_diff)))
        for column, desc in RANDOMISATION_CHECKS:
            if column in stat_diffs and f"random_{column}" in stat_diffs:
                check = randomisation_check(stat_diffs[column], stat_diffs[f"random_{column}"])
                path = group_path(output_dir, suffix="stats", extension=".tsv", seg=seg,
                                  stat=stat, desc=desc)
                out[f"{stat}_{desc}"] = _write_stats(path, check, opening[stat])
                checks.append((column, check))
                verdict = check.set_index("index")["check"]
                stat_diffs[column]["check"] = stat_diffs[column]["index"].map(verdict)
    for path in sorted(Path(output_dir).glob("models/*/*comparison*.tsv")):
        table = pd.read_csv(path, sep="\t")
        sections.append((f"Masking comparison: {path.parent.name}/{path.name}",
                         html_table(table)))
        out.setdefault("comparisons", []).append(path)
    if checks:
        sections.insert(0, ("Randomised-model check", _checks_html(checks)))
    if differences:  # what a reader looks for first, after whether the model is any good
        sections.insert(0, ("Group differences: top regions",
                            _top_differences_html(differences, html_table)
                            + "".join(figures)))
    sections.insert(0, ("Classifier out of fold", _evidence_html(evidence)))
    if not sections:
        sections.append(("No outputs", "<p>No attribution outputs were found; run "
                         "participant --mode predict first.</p>"))
    page = html_page("bids_roimae group report", sections,
                     subtitle=f"atlas {seg}, space {template.space}")
    out["html"] = write_text(Path(output_dir) / "group" / "group_report.html", page)
    return out


__all__ = ["build_group_report"]

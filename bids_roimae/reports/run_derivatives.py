"""Per-run attribution and fidelity outputs as BIDS derivatives, and reading them back.

Per run (``participant --mode predict``), named from the source BOLD's entities with
:func:`bids_roimae.io.bids_names.derivative_path`, following XCP-D where BIDS has no
rule::

    sub-01/func/sub-01_task-rest_run-1_space-<S>[_res-<R>]_stat-ig_desc-absmean_boldmap.nii.gz
    sub-01/func/sub-01_task-rest_run-1_space-<S>[_res-<R>]_stat-ig_desc-signedmean_boldmap.nii.gz
    sub-01/func/sub-01_task-rest_run-1_space-<S>_seg-<Atlas>_stat-ig_bold.tsv
    sub-01/func/sub-01_task-rest_run-1_space-<S>_seg-<Atlas>[_res-<R>]_stat-fidelity_desc-{error,shift}_boldmap.nii.gz
    sub-01/func/sub-01_task-rest_run-1_space-<S>_seg-<Atlas>_stat-fidelity_bold.tsv

each with a JSON sidecar. ``stat-`` and ``_boldmap`` are not in the BIDS schema, so these
files need the :data:`BIDSIGNORE` patterns; pybids finds them by entity with
:func:`pybids_config` added to its configs. Per participant ``sub-<label>.html`` (as
fMRIPrep does; :mod:`bids_roimae.reports.participant_report`) and a group folder ``group/``
(:mod:`bids_roimae.reports.group_report`) complete the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from bids_roimae.analysis.attribution import IGResult
from bids_roimae.analysis.evaluation import OutOfFoldSummary, evidence_sidecar
from bids_roimae.analysis.regions import (
    region_table,
    region_values,
    scaled_region_values,
    to_source_grid,
    token_map,
)
from bids_roimae.core.geometry import TokenGeometry
from bids_roimae.io.bids_names import derivative_path, name_entities
from bids_roimae.io.derivatives import save_image, write_sidecar, write_tsv

#: Patterns the dataset's ``.bidsignore`` needs for what this module writes.
BIDSIGNORE = ["*_stat-*", "*_boldmap.*", "*.html", "group"]
STAT_ENTITY_PATTERN = r"[_/\\]+stat-([a-zA-Z0-9]+)"


def pybids_config() -> dict:
    """A pybids config adding the ``stat`` entity (use with ``"bids", "derivatives"``).

    Example: ``BIDSLayout(out, validate=False, config=["bids", "derivatives",
    pybids_config()]).get(stat="ig", desc="absmean", extension=".nii.gz")``.
    """
    return {"name": "bids_roimae",
            "entities": [{"name": "stat", "pattern": STAT_ENTITY_PATTERN}]}


def _image(reference):
    """The reference as an image (its header only is read from a path)."""
    return reference if hasattr(reference, "affine") else nib.load(str(reference))


def _resolution_meta(res, reference) -> dict:
    if res is None:
        return {}
    zooms = " x ".join(f"{z:g}" for z in reference.header.get_zooms()[:3])
    return {"Resolution": {str(res): f"source BOLD grid, voxels of {zooms} mm"}}


def _region_columns(extra: Optional[dict] = None) -> dict:
    cols = {"index": "Atlas label", "name": "Region name", "system": "Functional system",
            "n_voxels": "Brain voxels of the region on the model grid",
            "rank": "Rank of the region (1 = most important)"}
    cols.update(extra or {})
    return cols


def write_run_attribution(output_dir, source_entities: dict, ig: IGResult,
                          geometry: TokenGeometry, reference, atlas_name: str,
                          atlas_table: pd.DataFrame, *, space: str, res=None,
                          model_meta: Optional[dict] = None,
                          sources: Sequence[str] = (),
                          randomised: Optional[IGResult] = None,
                          evidence: Optional[OutOfFoldSummary] = None) -> dict:
    """Write one run's IG maps (on the source grid) and its region table.

    The region table holds, per region, the mean ``|IG|`` (``mean_abs``), the same
    divided by the region's own input scale in each window (``scaled_mean_abs``), and,
    with ``randomised``, both for the classifier with a randomised head (``random_*``:
    what any model of this architecture would attribute, the model-randomisation check
    of Adebayo et al. 2018) and the ratio of the trained to the randomised ``mean_abs``
    (``relative_mean_abs``: the region's amplitude cancels, whatever the encoder's
    nonlinearity).
    The sidecar opens with the classifier's out-of-fold accuracy and AUC, and a warning
    when it is not above chance.

    Parameters
    ----------
    output_dir : path
    source_entities : dict
        Entities of the source BOLD (``sub``, ``ses``, ``task``, ``run``, ...).
    ig : IGResult
    geometry : TokenGeometry
        The model's geometry (its ``labels`` are the atlas on the model grid).
    reference : nibabel image or path
        The source BOLD (or its reference image); maps get its shape and affine.
    atlas_name, atlas_table : str, DataFrame
    space, res : str
        Space and resolution entities of the source (``res`` None when it has none).
    model_meta : dict, optional
        Model facts for the sidecars (checkpoint, name, preset, ...).
    sources : sequence of str
        Sidecar ``Sources`` (e.g. BIDS URIs of the BOLD and the model).
    randomised : IGResult, optional
        IG of the same windows by the classifier with a randomised head.
    evidence : OutOfFoldSummary, optional
        The classifier's out-of-fold performance.

    Returns
    -------
    dict
        ``{"absmean": Path, "signedmean": Path, "table": Path}``.
    """
    reference = _image(reference)
    meta = {**evidence_sidecar(evidence), **ig.metadata(), "Model": dict(model_meta or {}),
            "Atlas": atlas_name, "Sources": list(sources), "Space": space,
            **_resolution_meta(res, reference)}
    paths = {}
    for desc, values, what in (("absmean", ig.abs_mean, "mean |attribution|"),
                               ("signedmean", ig.signed_mean, "mean signed attribution")):
        img = to_source_grid(token_map(geometry, values), reference)
        path = derivative_path(output_dir, source_entities, suffix="boldmap",
                               extension=".nii.gz", space=space, res=res, stat="ig",
                               desc=desc)
        paths[desc] = save_image(img, path, {**meta, "Description":
                                             f"Integrated Gradients: {what} per voxel"})
    table = region_table(ig.abs_mean, geometry.labels, atlas_table,
                         signed_values=ig.signed_mean, mask=geometry.voxel_mask)
    columns = dict(SCALED_COLUMNS)
    ids = table["index"].to_numpy()
    table["scaled_mean_abs"] = scaled_region_values(ig.window_abs, ig.window_rms,
                                                    geometry.labels, ids, geometry.voxel_mask)
    table["scaled_rank"] = table["scaled_mean_abs"].rank(ascending=False,
                                                         method="min").astype("Int64")
    if randomised is not None:
        random_table = region_table(randomised.abs_mean, geometry.labels, atlas_table,
                                    mask=geometry.voxel_mask).set_index("index")
        table["random_mean_abs"] = random_table["mean_abs"].reindex(ids).to_numpy()
        table["random_scaled_mean_abs"] = scaled_region_values(
            randomised.window_abs, randomised.window_rms, geometry.labels, ids,
            geometry.voxel_mask)
        # The same input through the same encoder: whatever the region's amplitude does
        # to |IG| (linearly or not: layer norms make the response per unit of input fall
        # as amplitude grows) is in both, so the ratio is what the trained head adds.
        random_abs = table["random_mean_abs"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            table["relative_mean_abs"] = np.where(
                random_abs > 0, table["mean_abs"].to_numpy(dtype=float) / random_abs, np.nan)
        table["relative_rank"] = table["relative_mean_abs"].rank(
            ascending=False, method="min").astype("Int64")
        columns.update(RANDOMISED_COLUMNS)
    tpath = derivative_path(output_dir, source_entities, suffix="bold", extension=".tsv",
                            space=space, seg=atlas_name, stat="ig")
    paths["table"] = write_tsv(tpath, table)
    described = {c: {"Description": d} for c, d in _region_columns(columns).items()
                 if c in table}
    write_sidecar(tpath, {**evidence_sidecar(evidence), "Model": dict(model_meta or {}),
                          **described})
    return paths


SCALED_COLUMNS = {
    "mean_abs": "Mean |IG attribution| over the region's voxels (grows with the region's "
                "signal amplitude, whatever the model)",
    "signed_mean": "Mean signed IG attribution over the region's voxels",
    "scaled_mean_abs": "Per window, the region's mean |IG| divided by its RMS input about "
                       "the IG baseline (its signal SD for demeaned data), averaged over "
                       "windows: attribution per unit of the region's own amplitude",
    "scaled_rank": "Rank by scaled_mean_abs (1 = largest)"}
RANDOMISED_COLUMNS = {
    "random_mean_abs": "mean_abs of the same classifier with a randomised head (model "
                       "randomisation check): what the input alone produces",
    "random_scaled_mean_abs": "scaled_mean_abs of the classifier with a randomised head",
    "relative_mean_abs": "mean_abs / random_mean_abs: the trained classifier's |IG| relative "
                         "to a randomised head's on the same input, so the region's "
                         "amplitude cancels (> 1: the trained head relies on the region "
                         "more than chance weights would)",
    "relative_rank": "Rank by relative_mean_abs (1 = largest)"}


def write_run_fidelity(output_dir, source_entities: dict, fidelity: pd.DataFrame,
                       geometry: TokenGeometry, reference, atlas_name: str, *, space: str,
                       res=None, model_meta: Optional[dict] = None,
                       sources: Sequence[str] = ()) -> dict:
    """Write one run's region-fidelity table and maps painting each region's score.

    Parameters
    ----------
    fidelity : DataFrame
        From :func:`bids_roimae.analysis.fidelity.region_fidelity`.
    Other parameters as :func:`write_run_attribution`.

    Returns
    -------
    dict
        ``{"error": Path, "shift": Path, "table": Path}``.
    """
    reference = _image(reference)
    meta = {"Method": "region occlusion of the masked autoencoder (tube mask per region)",
            "Model": dict(model_meta or {}), "Atlas": atlas_name, "Sources": list(sources),
            "Space": space, "NumberOfRegions": int(len(fidelity)),
            **_resolution_meta(res, reference)}
    paths = {}
    for desc, column, what in (("error", "error", "reconstruction error (MSE)"),
                               ("shift", "embedding_shift", "embedding shift (L2)")):
        scores = dict(zip(fidelity["index"].astype(int), fidelity[column].astype(float)))
        img = to_source_grid(token_map(geometry, region_values(geometry, scores)), reference)
        path = derivative_path(output_dir, source_entities, suffix="boldmap",
                               extension=".nii.gz", space=space, res=res, seg=atlas_name,
                               stat="fidelity", desc=desc)
        paths[desc] = save_image(img, path, {**meta, "Description":
                                             f"Each region painted with its {what} when "
                                             "hidden from the encoder"})
    tpath = derivative_path(output_dir, source_entities, suffix="bold", extension=".tsv",
                            space=space, seg=atlas_name, stat="fidelity")
    paths["table"] = write_tsv(tpath, fidelity, _region_columns({
        "n_tokens": "Spatial tokens owned by the region",
        "error": "Mean reconstruction MSE of the region's tokens when it is hidden",
        "error_sd": "SD of error over windows",
        "error_relative": "error over the mean error of all regions in the same window, "
                          "averaged over windows (1 = a typical region)",
        "embedding_shift": "L2 distance of the pooled embedding with vs without the region",
        "embedding_shift_sd": "SD of embedding_shift over windows",
        "relative_shift": "embedding_shift / norm of the unmasked embedding",
        "embedding_cosine": "Cosine similarity of the embeddings with vs without the region",
        "error_rank": "Rank by error (1 = largest)"}))
    return paths


def find_outputs(output_dir, *, stat: str, suffix: str, desc: Optional[str] = None,
                 extension: str = ".tsv", subjects: Optional[Iterable[str]] = None
                 ) -> list[tuple[dict, Path]]:
    """Per-run files of the dataset with the given entities, as ``(entities, path)``."""
    found = []
    wanted = None if subjects is None else {str(s).removeprefix("sub-") for s in subjects}
    for path in sorted(Path(output_dir).glob(f"sub-*/**/sub-*_stat-{stat}*_{suffix}{extension}")):
        ents = name_entities(path)
        if ents.get("stat") != stat or ents.get("suffix") != suffix:
            continue
        if desc is not None and ents.get("desc") != desc:
            continue
        if wanted is not None and ents.get("sub") not in wanted:
            continue
        found.append((ents, path))
    return found


def read_region_tables(output_dir, stat: str, subjects: Optional[Iterable[str]] = None
                       ) -> pd.DataFrame:
    """Every run's region table for ``stat`` ("ig" or "fidelity"), stacked.

    Returns
    -------
    DataFrame
        The tables' columns plus ``subject``, ``session``, ``run_key``.
    """
    frames = []
    for ents, path in find_outputs(output_dir, stat=stat, suffix="bold", subjects=subjects):
        table = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)
        table["subject"] = ents["sub"]
        table["session"] = ents.get("ses")
        table["run_key"] = path.name.split("_space-")[0]
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

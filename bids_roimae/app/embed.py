"""``participant --mode embed``: the frozen pretrained encoder as a feature extractor.

Per participant (all of its prepared runs' windows), without any fine-tuned model::

    sub-<label>/func/sub-<label>_atlas-<atlas>_desc-mean_embedding.tsv       1 x D
    sub-<label>/func/sub-<label>_atlas-<atlas>_desc-region_embedding.tsv     R x D (+ .npy)
    sub-<label>/func/sub-<label>_atlas-<atlas>_desc-regioncorr_embedding.tsv R x R (+ .npy)

each with a JSON sidecar naming the model, its SHA-256 and the windows used. TSV rows
carry the atlas index and name of each region; the ``.npy`` files hold the same matrices
for numerical use. A participant with no window (every run shorter than one) is reported
and skipped; the exit code then says so (65).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bids_roimae.app.common import exit_code_for, prepare, start_output, with_prep
from bids_roimae.app.context import RunContext
from bids_roimae.config import MODEL_RESOLUTION
from bids_roimae.errors import BadDataError, OutputError
from bids_roimae.io import atomic
from bids_roimae.io.bids_names import derivative_path
from bids_roimae.io.checkpoint import load_model
from bids_roimae.io.derivatives import write_sidecar, write_tsv
from bids_roimae.io.model_store import pick_model
from bids_roimae.io.templates import load_template
from bids_roimae.training.features import EncoderFeatures, encoder_features
from bids_roimae.training.windows import subject_windows

log = logging.getLogger("bids_roimae")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    try:
        atomic.write_via(path, write, fsync=False)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _write_region_matrix(tsv: Path, npy: Path, matrix: np.ndarray, columns, index: pd.Index,
                         names: list, sidecar: dict) -> Path:
    """One row per region: a TSV with the region's index and name, the same matrix as
    float32 ``.npy``, and the TSV's sidecar."""
    table = pd.DataFrame(matrix, columns=columns, index=index)
    table.insert(0, "name", names)
    write_tsv(tsv, table.reset_index())
    _save_npy(npy, matrix.astype(np.float32))
    write_sidecar(tsv, sidecar)
    return tsv


def _write_features(ctx: RunContext, subject: str, feats: EncoderFeatures, atlas_name: str,
                    names: dict, model_info: dict) -> list[Path]:
    ents = {"subject": subject}
    region_index = pd.Index([int(i) for i in feats.region_ids], name="index")
    region_names = [names.get(int(i), f"region-{int(i)}") for i in feats.region_ids]
    dims = [f"dim{i:04d}" for i in range(feats.mean.size)]
    common = dict(model_info, NumberOfWindows=int(feats.n_windows))

    def path(desc, ext):
        return derivative_path(ctx.output_dir, ents, suffix="embedding", extension=ext,
                               atlas=atlas_name, desc=desc)

    mean = path("mean", ".tsv")
    write_tsv(mean, pd.DataFrame([feats.mean], columns=dims))
    write_sidecar(mean, dict(common, Readout="mean", Description=(
        "Mean of the frozen encoder's output over every token, time step and window")))
    region = _write_region_matrix(
        path("region", ".tsv"), path("region", ".npy"), feats.region, dims, region_index,
        region_names, dict(common, Readout="region", Description=(
            "Encoder tokens pooled per atlas region with each region's voxel weights (its "
            "own voxels in each token), averaged over time and windows; one row per "
            "region, same matrix in the .npy file"), index="Atlas region index",
            name="Region name"))
    corr = _write_region_matrix(
        path("regioncorr", ".tsv"), path("regioncorr", ".npy"), feats.region_correlation,
        region_names, region_index, region_names, dict(common, Readout="region-cov", Description=(
            "Across-time correlation of the region-pooled encoder tokens within each window "
            "(all feature dimensions pooled), averaged over windows; rows and columns in "
            "the order of the index column, same matrix in the .npy file")))
    written = [mean, region, corr]
    if feats.region_sd is not None:
        written.append(_write_region_matrix(
            path("regionsd", ".tsv"), path("regionsd", ".npy"), feats.region_sd, dims,
            region_index, region_names, dict(common, Readout="region-sd", Description=(
                "Across-time standard deviation of the region-pooled encoder tokens before "
                "the encoder's final norm, within each window, averaged over windows; one "
                "row per region, same matrix in the .npy file"), index="Atlas region index",
                name="Region name")))
    return written


def run_embed(ctx: RunContext) -> int:
    """Write every selected participant's frozen-encoder features (each readout)."""
    model_path = pick_model(ctx.output_dir, ctx.pretrained, "pretrain", "--pretrained")
    loaded = load_model(model_path, ctx.device, kind="pretrain")
    cfg, geometry, atlas = loaded.cfg, loaded.geometry, loaded.meta.atlas
    start_output(ctx)
    template = load_template(ctx.space, resolution=MODEL_RESOLUTION)
    entries, failures = prepare(ctx, ctx.discover(), geometry, template,
                                with_prep(ctx.cfg, cfg.prep, cfg.geometry.window))
    model_info = {"Model": model_path.parent.name, "Checkpoint": str(model_path),
                  "ModelSHA256": file_sha256(model_path), "Preset": cfg.model.preset,
                  "Masking": cfg.masking.strategy, "Atlas": atlas.name,
                  "WindowFrames": cfg.geometry.window,
                  "WindowsPerRun": ctx.cfg.finetune.windows_per_run}
    names = dict(zip(atlas.index, atlas.names))
    by_subject: dict[str, list] = {}
    for entry in entries:
        by_subject.setdefault(str(entry.subject), []).append(entry)
    for subject, subj_entries in sorted(by_subject.items()):
        refs = subject_windows(subj_entries, cfg.geometry.window,
                               ctx.cfg.finetune.windows_per_run).get(subject)
        if not refs:
            err = BadDataError(f"sub-{subject}: no run has {cfg.geometry.window} frames (one "
                               "window); no features written")
            log.error("%s", err)
            failures.append((subject, err))
            continue
        feats = encoder_features(loaded.model, refs, geometry, cfg.geometry.window,
                                 ctx.cfg.finetune.batch_size, ctx.device)
        paths = _write_features(ctx, subject, feats, atlas.name, names, model_info)
        log.info("sub-%s: features of %d windows -> %s", subject, feats.n_windows,
                 paths[0].parent)
    return exit_code_for(failures)

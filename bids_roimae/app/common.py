"""Pieces every step shares: the output dataset, the model grid, preparing runs."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from bids_roimae.app.context import RunContext
from bids_roimae.config import MODEL_RESOLUTION, AppConfig, PrepConfig
from bids_roimae.core.geometry import TokenGeometry, build_geometry, describe_regions
from bids_roimae.errors import EXIT_OK, AppError
from bids_roimae.io.atlas import Atlas, check_atlas_on_grid, load_atlas, resample_labels
from bids_roimae.io.cache import CacheEntry, lookup
from bids_roimae.io.derivatives import (
    ensure_output_dir,
    write_bidsignore,
    write_dataset_description,
)
from bids_roimae.io.discovery import BoldRun, find_derivatives
from bids_roimae.io.preparation import prepare_runs
from bids_roimae.io.templates import Template, load_template
from bids_roimae.reports.run_derivatives import BIDSIGNORE
from bids_roimae.training.distributed import DistContext

log = logging.getLogger("bids_roimae")


@dataclass
class ModelGrid:
    """The template, the atlas on its grid (when asked for) and the token geometry."""

    template: Template
    geometry: TokenGeometry
    atlas: Optional[Atlas] = None
    labels: Optional[np.ndarray] = None  # atlas labels on the template grid


def start_output(ctx: RunContext) -> None:
    """Create OUTPUT_DIR as a derivative dataset (description, ``.bidsignore``)."""
    ensure_output_dir(ctx.output_dir)
    fmriprep = find_derivatives(ctx.bids_dir, ctx.derivatives)
    sources = [ctx.bids_dir.as_uri()]
    if fmriprep.resolve() != ctx.bids_dir.resolve():
        sources.append(fmriprep.as_uri())
    write_dataset_description(ctx.output_dir, source_datasets=sources)
    # Non-schema outputs (3D statistical maps, region tables, figures, reports) are
    # listed so the dataset still passes the BIDS validator.
    write_bidsignore(ctx.output_dir, ["cache/", "models/", "logs/", "*.svg", "*.png",
                                      "*_predictions.*", "*_embedding.*"] + BIDSIGNORE)


def model_grid(ctx: RunContext, cfg: AppConfig, with_atlas: bool) -> ModelGrid:
    """Template, atlas (when ``with_atlas``) and the token geometry of ``cfg``."""
    template = load_template(ctx.space, resolution=MODEL_RESOLUTION)
    mask = np.asanyarray(template.mask_img.dataobj) > 0
    atlas, labels = None, None
    if with_atlas:
        atlas = load_atlas(ctx.atlas, desc=ctx.atlas_desc, atlas_file=ctx.atlas_file,
                           labels_file=ctx.atlas_labels, space=ctx.space)
        labels, _vanished = resample_labels(atlas, template.mask_img)
    g = cfg.geometry
    geometry = build_geometry(mask, template.mask_img.affine, labels, g.patch_size,
                              g.roi_assign, g.min_brain_fraction)
    if atlas is not None:
        log.info("%s: %s", atlas.name, describe_regions(
            geometry, ids=list(atlas.table["index"])))
        check_atlas_on_grid(atlas, geometry, roi_masking=cfg.masking.strategy == "roi")
    return ModelGrid(template, geometry, atlas, labels)


def with_prep(cfg: AppConfig, prep_cfg: PrepConfig, window: Optional[int] = None
              ) -> AppConfig:
    """``cfg`` with a model's preprocessing (and window), so prepared caches match it."""
    out = copy.deepcopy(cfg)
    out.prep = copy.deepcopy(prep_cfg)
    if window is not None:
        out.geometry.window = int(window)
    return out


def prepare(ctx: RunContext, runs: Sequence[BoldRun], geometry: TokenGeometry,
            template: Template, cfg: AppConfig
            ) -> tuple[list[CacheEntry], list[tuple[BoldRun, AppError]]]:
    """Prepare (or find cached) every run; failures are logged and returned."""
    entries, failures = prepare_runs(runs, geometry, template.mask_img, cfg.prep,
                                     ctx.output_dir, window=cfg.geometry.window,
                                     nprocs=ctx.nprocs, work_dir=ctx.work_dir,
                                     space=ctx.space)
    if failures:
        log.warning("%d of %d runs were skipped (see the errors above)", len(failures),
                    len(runs))
    return entries, failures


def prepare_shared(ctx: RunContext, runs: Sequence[BoldRun], geometry: TokenGeometry,
                   template: Template, cfg: AppConfig, dist: DistContext
                   ) -> tuple[list[CacheEntry], list[tuple[BoldRun, AppError]]]:
    """:func:`prepare` under ``torchrun``: each run is prepared once, by one rank.

    Rank ``r`` prepares every ``world``-th run (with ``--nprocs`` processes of its own);
    the ranks then wait for each other and exchange their failures, and every rank opens
    all the successful runs from the shared cache. OUTPUT_DIR must be on a filesystem all
    ranks see (as the checkpoint written by rank 0 must be); a run a rank cannot find
    there after the wait is prepared again, with a warning, rather than left out.

    Returns
    -------
    entries : list of CacheEntry
        Every successful run, in ``runs`` order, the same on every rank.
    failures : list of (BoldRun, AppError)
        Every rank's failures, the same on every rank.
    """
    if not dist.active:
        return prepare(ctx, runs, geometry, template, cfg)
    mine = dist.shard(runs)
    log.info("rank %d of %d prepares %d of %d runs", dist.rank, dist.world, len(mine),
             len(runs))
    _, failed = prepare_runs(mine, geometry, template.mask_img, cfg.prep, ctx.output_dir,
                             window=cfg.geometry.window, nprocs=ctx.nprocs,
                             work_dir=ctx.work_dir, space=ctx.space)
    # every rank's (run key, error) pairs; waiting here is the barrier after preparation
    failed_keys = {key: err for rank_failures in dist.gather_objects(
        [(run.key, err) for run, err in failed]) for key, err in rank_failures}
    failures = [(run, failed_keys[run.key]) for run in runs if run.key in failed_keys]
    usable = [run for run in runs if run.key not in failed_keys]
    unseen = [run.key for run in usable
              if lookup(ctx.output_dir, run, geometry, cfg.prep, ctx.space) is None]
    if unseen:
        log.warning("rank %d does not see %d prepared runs in %s (is OUTPUT_DIR shared by "
                    "all nodes?); preparing them here: %s", dist.rank, len(unseen),
                    ctx.output_dir, ", ".join(unseen[:5]))
    entries, late = prepare_runs(usable, geometry, template.mask_img, cfg.prep,
                                 ctx.output_dir, window=cfg.geometry.window,
                                 nprocs=ctx.nprocs if unseen else 1, work_dir=ctx.work_dir,
                                 space=ctx.space)
    failures += late
    if failures:
        log.warning("%d of %d runs were skipped (see the errors above)", len(failures),
                    len(runs))
    return entries, failures


def exit_code_for(failures: list) -> int:
    """The exit code when some runs failed: that of the first failure (0 if none)."""
    for _, err in failures:
        if isinstance(err, AppError):
            return err.exit_code
    return 1 if failures else EXIT_OK

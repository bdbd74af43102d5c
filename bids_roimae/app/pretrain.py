"""``group --mode pretrain``: the ROI-guided (or random) masked autoencoder."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np

from bids_roimae.app.common import exit_code_for, model_grid, prepare_shared, start_output
from bids_roimae.app.context import RunContext
from bids_roimae.config import MODEL_RESOLUTION
from bids_roimae.errors import MissingInputError
from bids_roimae.io.checkpoint import AtlasMeta
from bids_roimae.io.derivatives import write_atlas_files
from bids_roimae.io.model_store import models_dir
from bids_roimae.training.distributed import setup_distributed
from bids_roimae.training.pretrain import model_name, run_pretraining

log = logging.getLogger("bids_roimae")


def run_pretrain(ctx: RunContext) -> int:
    """Prepare what is not cached, then pretrain on every selected subject.

    Under ``torchrun`` the process group is joined first, so the runs to prepare are
    shared out between the ranks (each run is prepared once) before all ranks train.
    """
    dist = setup_distributed(ctx.device)
    try:
        runs = ctx.discover()
        start_output(ctx)
        grid = model_grid(ctx, ctx.cfg, with_atlas=True)
        entries, failures = prepare_shared(ctx, runs, grid.geometry, grid.template, ctx.cfg,
                                           dist)
        if not entries:
            raise MissingInputError("no usable BOLD run to pretrain on (all were skipped)")
        atlas = grid.atlas
        if dist.rank == 0:
            labels_img = nib.Nifti1Image(grid.labels.astype(np.int16),
                                         grid.template.mask_img.affine)
            write_atlas_files(ctx.output_dir, atlas.name, labels_img, atlas.table, ctx.space,
                              MODEL_RESOLUTION)
        model_dir = models_dir(ctx.output_dir) / (ctx.model_name or model_name(ctx.cfg))
        meta = AtlasMeta.from_table(atlas.name, atlas.table, desc=atlas.desc,
                                    source=str(atlas.source),
                                    atlas_hash=grid.geometry.atlas_hash)
        ckpt = run_pretraining(entries, grid.geometry, ctx.cfg, model_dir, device=dist.device,
                               resume=ctx.resume, atlas=meta)
        log.info("pretrained model: %s", ckpt)
        return exit_code_for(failures)
    finally:
        dist.close()

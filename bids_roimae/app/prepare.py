"""``participant --mode prepare``: the selected subjects' model-ready token caches."""

from __future__ import annotations

import logging

from bids_roimae.app.common import exit_code_for, model_grid, prepare, start_output
from bids_roimae.app.context import RunContext
from bids_roimae.io.cache import cache_root

log = logging.getLogger("bids_roimae")


def run_prepare(ctx: RunContext) -> int:
    """Index the selected subjects' BOLD runs and write their token caches."""
    runs = ctx.discover()
    start_output(ctx)
    # Region-split tokens (the exact rule) follow the atlas, so the cache does too: the
    # group level must find what the participant level wrote.
    grid = model_grid(ctx, ctx.cfg, with_atlas=ctx.cfg.geometry.roi_assign == "exact")
    log.info("%d BOLD runs selected; %d brain tokens of %d^3 voxels per frame", len(runs),
             grid.geometry.n_tokens, grid.geometry.patch_size)
    entries, failures = prepare(ctx, runs, grid.geometry, grid.template, ctx.cfg)
    log.info("prepared %d runs into %s", len(entries), cache_root(ctx.output_dir))
    return exit_code_for(failures)

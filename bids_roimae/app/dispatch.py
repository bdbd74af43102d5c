"""Runs the step of ``(analysis level, mode)`` after validating the input dataset."""

from __future__ import annotations

import logging

from bids_roimae.app.context import RunContext
from bids_roimae.app.embed import run_embed
from bids_roimae.app.finetune import run_finetune
from bids_roimae.app.predict import run_predict
from bids_roimae.app.prepare import run_prepare
from bids_roimae.app.pretrain import run_pretrain
from bids_roimae.app.report import run_report
from bids_roimae.app.validation import validate_bids
from bids_roimae.errors import EXIT_OK

log = logging.getLogger("bids_roimae")

STEPS = {
    ("participant", "prepare"): run_prepare,
    ("group", "pretrain"): run_pretrain,
    ("participant", "finetune"): run_finetune,
    ("participant", "predict"): run_predict,
    ("participant", "embed"): run_embed,
    ("group", "report"): run_report,
}


def run(ctx: RunContext) -> int:
    """Validate BIDS_DIR, then run the step of ``(ctx.level, ctx.mode)``; its exit code."""
    log.info("bids_roimae %s level, mode %s: %s -> %s", ctx.level, ctx.mode, ctx.bids_dir,
             ctx.output_dir)
    validate_bids(ctx)
    code = STEPS[(ctx.level, ctx.mode)](ctx)
    return EXIT_OK if code is None else code

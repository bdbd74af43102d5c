"""``participant --mode finetune``: cross-validated fine-tuning on a participants.tsv column,
or the masking comparison of several pretrained models on the same folds."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from bids_roimae.analysis.labels import parse_groups, parse_labels
from bids_roimae.app.common import exit_code_for, prepare, start_output, with_prep
from bids_roimae.app.context import RunContext
from bids_roimae.config import MODEL_RESOLUTION, AppConfig
from bids_roimae.core.geometry import TokenGeometry
from bids_roimae.errors import MissingInputError
from bids_roimae.io.checkpoint import read_model_info
from bids_roimae.io.discovery import read_participants
from bids_roimae.io.model_store import find_models, models_dir, pick_model
from bids_roimae.io.templates import load_template
from bids_roimae.training.comparison import checkpoint_label, compare_masking
from bids_roimae.training.finetune import run_finetune as finetune_model

log = logging.getLogger("bids_roimae")


def _labelled_entries(ctx: RunContext, labels: pd.Series, geometry: TokenGeometry,
                      model_cfg: AppConfig):
    """Prepared runs (preparing what is missing) of the selected, labelled subjects, with
    the pretrained model's preprocessing and window."""
    labelled = set(labels.index)
    runs = [r for r in ctx.discover() if r.subject in labelled]
    if not runs:
        raise MissingInputError("none of the labelled participants has a BOLD run in "
                                f"{ctx.space} among the selected ones")
    template = load_template(ctx.space, resolution=MODEL_RESOLUTION)
    cfg = with_prep(ctx.cfg, model_cfg.prep, model_cfg.geometry.window)
    return prepare(ctx, runs, geometry, template, cfg)


def _comparison_models(ctx: RunContext) -> dict[str, Path]:
    """Every pretrained model in OUTPUT_DIR/models, named ``<masking>-seed<seed>``, the
    random-masking ones first so differences read roi - random. Several seeds of one
    masking are pooled by the comparison."""
    paths = find_models(ctx.output_dir, "pretrain")
    if len(paths) < 2:
        raise MissingInputError(
            f"--compare-masking needs two pretrained models in {models_dir(ctx.output_dir)} "
            "(run 'group --masking roi' and 'group --masking random', with --seed for "
            "several seeds)")
    configs = {p: read_model_info(p)[0] for p in paths}
    named: dict[str, Path] = {}
    for path, cfg in sorted(configs.items(),
                            key=lambda kv: (kv[1].masking.strategy != "random", kv[1].seed)):
        named[checkpoint_label(cfg.masking.strategy, cfg.seed, set(named))] = path
    return named


def run_finetune(ctx: RunContext) -> int:
    """Fine-tune the pretrained encoder on a participants.tsv column, cross-validated."""
    start_output(ctx)
    participants = read_participants(ctx.bids_dir)
    if ctx.participant_labels:
        participants = participants[participants.index.isin(ctx.participant_labels)]
    labels, info = parse_labels(participants, ctx.target, ctx.positive,
                                ctx.cfg.finetune.task_type)
    groups = parse_groups(participants, ctx.cv_group)[0] if ctx.cv_group else None
    if ctx.compare_masking:
        models = _comparison_models(ctx)
    else:
        models = {"model": pick_model(ctx.output_dir, ctx.pretrained, "pretrain",
                                      "--pretrained")}
    model_cfg, geometry, _ = read_model_info(next(iter(models.values())))
    entries, failures = _labelled_entries(ctx, labels, geometry, model_cfg)
    if ctx.compare_masking:
        out_dir = models_dir(ctx.output_dir) / "masking_comparison"
        result = compare_masking(models, entries, labels, ctx.cfg, out_dir,
                                 device=ctx.device, groups=groups, label_info=info,
                                 allow_mismatch=ctx.allow_mismatch)
        if result["mismatch"]:
            log.warning("compared models differ in: %s", "; ".join(result["mismatch"]))
        table = result["table"]
        shown = table[table["metric"].isin(["accuracy", "roc_auc"])]
        log.info("masking comparison (difference [95%% interval], p; details in %s):\n%s",
                 out_dir, shown[["metric", "model", "reference", "estimate", "ci_low",
                                 "ci_high", "p", "test"]].round(3).to_string(index=False))
    else:
        result = finetune_model(entries, labels, models["model"], ctx.cfg, ctx.output_dir,
                                device=ctx.device, groups=groups, label_info=info)
        summary = ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}"
                            for k, v in result["metrics"].items())
        log.info("fine-tuned %s: %s", result["name"], summary)
        if result["baseline_metrics"]:
            log.info("%s baseline on the same folds: %s", ctx.cfg.finetune.baseline,
                     ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}"
                               for k, v in result["baseline_metrics"].items()))
    return exit_code_for(failures)

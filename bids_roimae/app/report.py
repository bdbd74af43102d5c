"""``group --mode report``: the group summary of attribution and fidelity outputs."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd

from bids_roimae.analysis.evaluation import CHANCE_WARNING, OutOfFoldSummary
from bids_roimae.analysis.group_stats import complete_covariates
from bids_roimae.analysis.labels import parse_labels
from bids_roimae.app.common import start_output
from bids_roimae.app.context import RunContext
from bids_roimae.config import MODEL_RESOLUTION
from bids_roimae.errors import EXIT_OK, AppError, MissingInputError, UsageError
from bids_roimae.io.checkpoint import read_model_info
from bids_roimae.io.discovery import read_participants
from bids_roimae.io.model_store import find_models
from bids_roimae.io.run_files import mean_framewise_displacement
from bids_roimae.io.templates import load_template
from bids_roimae.reports.group_report import build_group_report

log = logging.getLogger("bids_roimae")


def _report_groups(ctx: RunContext, participants: pd.DataFrame, target: str,
                   label_info: dict) -> Optional[str]:
    """Add a ``group`` column to ``participants`` with the classes the model was trained
    on (e.g. ADHD-200 codes 1, 2, 3 -> positive, 0 -> negative); returns its name."""
    positive = list(ctx.positive or label_info.get("positive") or [])
    task = label_info.get("task_type") or ctx.cfg.finetune.task_type
    if task == "regression":
        return None  # group differences need groups
    try:
        labels, info = parse_labels(participants, target, positive or None, task)
    except AppError as exc:  # the report still works without group differences
        log.warning("no group differences in the report: %s", exc)
        return None
    classes = list(info.get("classes") or [])
    if task == "binary" and info.get("positive"):
        classes = [f"{target}={'/'.join(info['negative'])}",
                   f"{target}={'/'.join(info['positive'])}"]
    groups = labels.map(lambda v: classes[int(v)] if classes else v)
    # The trained classes' order: the negative (reference) class first, so group
    # differences read as positive minus negative.
    participants["group"] = (pd.Categorical(groups, categories=classes) if classes
                             else groups)
    return "group"


def _covariates(ctx: RunContext, participants: pd.DataFrame) -> pd.DataFrame:
    """The ``--covariates`` per participant: participants.tsv columns (matched ignoring case)
    and ``meanfd``, the mean framewise displacement over the participant's runs."""
    by_key = {str(c).strip().lower(): c for c in participants.columns}
    columns = {}
    for name in ctx.covariates:
        key = name.strip().lower()
        if key == "meanfd":
            columns["meanfd"] = _mean_fd(ctx).reindex(participants.index.astype(str))
        elif key in by_key:
            columns[str(by_key[key])] = participants[by_key[key]].replace("n/a", None)
        else:
            raise UsageError(f"--covariates {name}: participants.tsv has no such column "
                             f"(columns: {', '.join(map(str, participants.columns))}; or "
                             "meanfd)")
    out = pd.DataFrame(columns)
    out.index = participants.index.astype(str).str.removeprefix("sub-")
    return out


def _mean_fd(ctx: RunContext) -> pd.Series:
    """Mean framewise displacement per participant, averaged over its runs' confounds."""
    values: dict[str, list] = {}
    for run in ctx.discover():
        if run.confounds_path is not None:
            values.setdefault(run.subject, []).append(
                mean_framewise_displacement(run.confounds_path))
    return pd.Series({s: float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
                      for s, v in values.items()}, dtype=float)


def _complete(covariates: pd.DataFrame) -> pd.DataFrame:
    """Participants with every covariate; one log line names those left out."""
    complete, missing = complete_covariates(covariates, covariates.index)
    if missing:
        log.warning("left out of the covariate-adjusted group tables (a covariate of %s is "
                    "missing): %s", ", ".join(covariates.columns),
                    " ".join(f"sub-{s}" for s in missing))
    return complete


def run_report(ctx: RunContext) -> int:
    """Group summary of the attribution and fidelity outputs, with figures and HTML."""
    start_output(ctx)
    models = find_models(ctx.output_dir, "finetune") or find_models(ctx.output_dir,
                                                                    "pretrain")
    if not models:
        raise MissingInputError(f"nothing to report in {ctx.output_dir}: run pretraining, "
                                "fine-tuning and 'participant --mode predict' first")
    meta = read_model_info(models[0])[2]
    target = ctx.target or meta.label_info.get("target")
    try:
        participants = read_participants(ctx.bids_dir)
    except MissingInputError:
        participants = None
    label_column = None
    if participants is not None and target:
        label_column = _report_groups(ctx, participants, target, meta.label_info)
    covariates = None
    if ctx.covariates:
        if participants is None:
            raise MissingInputError("--covariates needs BIDS_DIR/participants.tsv")
        covariates = _complete(_covariates(ctx, participants))
    evidence = OutOfFoldSummary.from_dict(meta.out_of_fold)
    if evidence is None:
        log.warning("%s stores no out-of-fold evaluation: the report cannot say whether "
                    "the classifier is above chance", models[0].parent.name)
    elif not evidence.above_chance:
        log.warning("%s: %s %s", models[0].parent.name, evidence.headline(), CHANCE_WARNING)
    template = load_template(ctx.space, resolution=MODEL_RESOLUTION)
    out = build_group_report(ctx.output_dir, participants, meta.atlas.name, meta.atlas.table,
                             template, label_column=label_column,
                             subjects=ctx.participant_labels or None, evidence=evidence,
                             covariates=covariates)
    log.info("group report: %s", out["html"])
    return EXIT_OK

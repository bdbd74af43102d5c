"""Participant-level fine-tuning: honest cross-validation, the refit model, prediction.

:func:`run_finetune` cross-validates a strategy (:mod:`bids_roimae.training.classifier_fit`) over
subjects (folds from :mod:`bids_roimae.analysis.evaluation`), writes every subject's out-of-fold
prediction and the fold metrics, then refits on all labelled subjects and saves that
model as ``OUTPUT_DIR/models/<pretrained>_ft-<target>_<strategy>/model.pt``: a checkpoint
that :func:`bids_roimae.io.checkpoint.load_model` rebuilds with no other input (encoder
configuration, geometry, head, standardisation, label mapping, target and positive codes).
:func:`predict_subject` applies such a model to one subject's prepared runs. The
cross-validation itself (inputs, embeddings, fitting, out-of-fold predictions) is in
:mod:`bids_roimae.training.cross_validation`.

Outputs of a fine-tuning run::

    models/<name>/model.pt  fold_metrics.tsv  metrics.json  predictions.tsv
    models/<name>/baseline_fold_metrics.tsv  baseline_predictions.tsv  (unless --baseline none)
    sub-<label>/func/sub-<label>_desc-finetune_predictions.tsv (+ .json)  one row per model
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from torch import nn

from bids_roimae.analysis.evaluation import (
    PREDICTION_COLUMNS,
    OutOfFoldSummary,
    decode_output,
    make_repeated_folds,
    mean_sd,
    out_of_fold_summary,
    prediction_rows,
    summarise_folds,
)
from bids_roimae.analysis.labels import label_attrs
from bids_roimae.errors import BadDataError, OutputError, UsageError
from bids_roimae.io.bids_names import derivative_path
from bids_roimae.io.checkpoint import HeadSpec, ModelMeta, load_model, save_checkpoint
from bids_roimae.io.derivatives import write_json, write_tsv
from bids_roimae.model.classifier import Classifier, n_outputs, subject_output
from bids_roimae.model.readout import build_readout
from bids_roimae.training.baseline import (
    BASELINE_DESCRIPTIONS,
    cache_region_series,
    cross_validate_baseline,
)
from bids_roimae.training.classifier_fit import window_logits
from bids_roimae.training.cross_validation import (
    cross_validate,
    fit_classifier,
    frozen_embeddings,
    prepare_inputs,
)
from bids_roimae.training.windows import subject_windows

log = logging.getLogger(__name__)

# -- names and loading ------------------------------------------------------------------
def pretrained_name(path) -> str:
    """Name of a pretrained model: its folder under ``models/``, else the file stem."""
    path = Path(path)
    return path.name if path.is_dir() else (path.parent.name if path.name == "model.pt"
                                            else path.stem)


def recorded_pretrained(path, models_folder) -> str:
    """How a fine-tuned model names its pretrained model: relative to the models folder
    when it is in it (``roimae_.../model.pt``), so a copied or moved output folder still
    finds its own; an absolute path otherwise."""
    path = Path(path).absolute()
    try:
        return path.relative_to(Path(models_folder).absolute()).as_posix()
    except ValueError:
        return str(path)


def finetuned_name(pretrained, target: str, strategy: str) -> str:
    """``<pretrained>_ft-<target>_<strategy>`` with the target reduced to letters/digits."""
    clean = re.sub(r"[^0-9A-Za-z]+", "", str(target)) or "target"
    return f"{pretrained_name(pretrained)}_ft-{clean}_{strategy}"


def merged_config(pre_cfg, cfg):
    """The pretrained model's architecture and geometry with this run's fine-tuning."""
    out = copy.deepcopy(pre_cfg)
    out.finetune = copy.deepcopy(cfg.finetune)
    out.seed = cfg.seed
    return out


def check_entries(entries: Sequence, geometry) -> None:
    expected = (geometry.n_tokens, geometry.patch_voxels)
    for entry in entries[:1]:
        shape = tuple(int(s) for s in entry.tokens().shape[1:])
        if shape != expected:
            raise BadDataError(f"{entry.run_key}: cached tokens are {shape} (N, P) but the "
                               f"model expects {expected}; prepare with the model's geometry")


def readout_encoder(loaded, readout: str, device) -> nn.Module:
    """The pretrained model behind ``readout`` (:func:`build_readout`) on ``device``.

    Raises
    ------
    UsageError
        The readout does not fit the model (``region-sd`` on one time token per window).
    """
    try:
        return build_readout(loaded.model, readout, loaded.geometry).to(device)
    except ValueError as exc:
        raise UsageError(f"--readout {readout}: {exc}") from exc


# -- the participant-level workflow -----------------------------------------------------
def run_finetune(entries: Sequence, labels: pd.Series, pretrained, cfg, output_dir, *,
                 device="cpu", groups: Optional[pd.Series] = None,
                 label_info: Optional[dict] = None, name: Optional[str] = None) -> dict:
    """Cross-validate, write out-of-fold predictions and metrics, refit and save.

    Parameters
    ----------
    entries : sequence of CacheEntry
        Prepared runs (any subjects; those without a label are skipped).
    labels : Series
        From :func:`~bids_roimae.analysis.labels.parse_labels` (its ``attrs`` carry the label
        mapping; or pass ``label_info``).
    pretrained : path
        Pretrained checkpoint (``model.pt``) or its folder.
    cfg : AppConfig
        This run's settings; ``finetune`` and ``seed`` are used, the architecture and
        geometry come from the pretrained checkpoint.
    output_dir : path
        The derivative dataset.
    groups : Series, optional
        CV group per subject (``--cv-group``): leave-one-group-out.

    Returns
    -------
    dict
        ``model_path``, ``model_dir``, ``name``, ``metrics`` ({metric: {mean, sd}}),
        ``n_subjects``, ``n_folds``, ``excluded`` (counts), ``predictions`` (DataFrame).
    """
    output_dir = Path(output_dir)
    loaded = load_model(pretrained, device, kind="pretrain")
    geometry = loaded.geometry
    run_cfg = merged_config(loaded.cfg, cfg)
    encoder = readout_encoder(loaded, run_cfg.finetune.readout, device)
    check_entries(list(entries), geometry)
    labels, refs, groups, info, counts = prepare_inputs(entries, labels, run_cfg, groups,
                                                        label_info)
    task, strategy = info["task_type"], run_cfg.finetune.strategy
    repeats = make_repeated_folds(labels.to_numpy(), run_cfg.finetune.folds,
                                  run_cfg.finetune.cv_repeats, run_cfg.seed, task,
                                  None if groups is None else groups.to_numpy())
    folds = repeats[0]
    log.info("fine-tuning %s (%s) on %d subjects, %d repeats x %d folds", info.get("target"),
             strategy, labels.size, len(repeats), len(folds))
    emb = frozen_embeddings(encoder, refs, run_cfg, device)
    # Repeat 0's fold models are kept: with a frozen encoder only their heads are stored,
    # and predict attributes each CV participant with the one that never trained on it.
    fold_models: list = []
    runs = [cross_validate(encoder, labels, refs, run_cfg, info, f, device, emb,
                           fold_models=fold_models if r == 0 and strategy != "full" else None)
            for r, f in enumerate(repeats)]
    predictions = runs[0][0]
    table = _repeated_fold_table([t for _, t in runs], task)
    oof = _out_of_fold(runs, labels, task)
    final = fit_classifier(encoder, strategy, list(labels.index), labels.to_numpy(), refs, emb,
                 run_cfg, info, device, seed=run_cfg.seed)
    baseline = None  # the classical arm on every repeat's folds: [(predictions, table)]
    baseline_name = run_cfg.finetune.baseline
    if baseline_name != "none":
        baseline = run_baseline(entries, geometry, labels, info, repeats, run_cfg)
        baseline_table = _repeated_fold_table([t for _, t in baseline], task)
        baseline_oof = _out_of_fold(baseline, labels, task)
        if oof is not None and baseline_oof is not None:
            oof = dataclasses.replace(oof, baseline_name=baseline_name, baseline=baseline_oof)

    name = name or finetuned_name(pretrained, info.get("target", "target"), strategy)
    model_dir = output_dir / "models" / name
    summary = {"name": name, "target": info.get("target"), "task_type": task,
               "strategy": strategy,
               "pretrained": recorded_pretrained(loaded.path, output_dir / "models"),
               "cv": "leave-one-group-out" if groups is not None else "stratified-kfold",
               "n_folds": len(folds), "n_repeats": len(repeats), "n_subjects": int(labels.size),
               "readout": run_cfg.finetune.readout,
               "seed": run_cfg.seed, "label_info": info, "metrics": mean_sd(table),
               "out_of_fold": None if oof is None else oof.to_dict(),
               "fold_models_stored": len(fold_models),
               "excluded": counts["counts"], "folds": table.reset_index().to_dict("records")}
    if baseline is not None:
        summary["baseline"] = {
            "name": baseline_name,
            "connectivity": run_cfg.finetune.connectivity
            if baseline_name == "connectome" else None,
            "description": BASELINE_DESCRIPTIONS[baseline_name],
            "metrics": mean_sd(baseline_table),
            "folds": baseline_table.reset_index().to_dict("records")}
    if oof is not None:
        log.info("%s%s", oof.headline(), "" if oof.above_chance else
                 " -- NOT above chance: attributions of this model are not evidence")
    _save_finetuned(model_dir / "model.pt", final, run_cfg, geometry, loaded.meta, info,
                    summary, fold_models, list(labels.index))
    _write_tsv(model_dir / "fold_metrics.tsv", table.reset_index())
    _write_json(model_dir / "metrics.json", summary)
    rows = prediction_rows(predictions, info, name)
    _write_tsv(model_dir / "predictions.tsv", rows)
    if baseline is not None:
        _write_tsv(model_dir / "baseline_fold_metrics.tsv", baseline_table.reset_index())
        _write_tsv(model_dir / "baseline_predictions.tsv",
                   prediction_rows(baseline[0][0], info, baseline_name))
    for subject, row in rows.groupby("participant_id", sort=False):
        _write_subject_predictions(output_dir, subject, row)
    return {"model_path": model_dir / "model.pt", "model_dir": model_dir, "name": name,
            "metrics": summary["metrics"], "n_subjects": int(labels.size),
            "n_folds": len(folds), "n_repeats": len(repeats), "out_of_fold": oof,
            "excluded": counts["counts"], "predictions": rows,
            "baseline_metrics": None if baseline is None else summary["baseline"]["metrics"],
            "baseline_predictions": None if baseline is None else baseline[0][0]}


def _repeated_fold_table(tables: Sequence[pd.DataFrame], task: str) -> pd.DataFrame:
    """Every repeat's folds in one table (``repeat`` column; ``fold`` restarts at 0 in each
    repeat), then mean and SD over all of them."""
    per_fold = [t.drop(index=["mean", "sd"]).assign(repeat=r) for r, t in enumerate(tables)]
    rows = pd.concat(per_fold)
    table = summarise_folds(rows.to_dict("records"), task)
    table.insert(0, "repeat", list(rows["repeat"]) + [None, None])
    table.index = pd.Index(list(rows.index) + ["mean", "sd"], name="fold")
    return table


def run_baseline(entries: Sequence, geometry, labels: pd.Series, info: dict, repeats, cfg
                 ) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """The built-in baseline (``cfg.finetune.baseline``, ``connectivity``) on every
    repeat's folds, from the labelled subjects' prepared runs (read once); per repeat the
    outputs of :func:`~bids_roimae.training.cross_validation.cross_validate`."""
    wanted = {str(s) for s in labels.index}
    series = cache_region_series([e for e in entries if str(e.subject) in wanted], geometry)
    features = cfg.finetune.baseline
    log.info("%s baseline%s on the same %d repeats x %d folds", features,
             f" ({cfg.finetune.connectivity})" if features == "connectome" else "",
             len(repeats), len(repeats[0]))
    return [cross_validate_baseline(series, labels, info, folds, features=features,
                                    kind=cfg.finetune.connectivity, seed=cfg.seed)
            for folds in repeats]


def _out_of_fold(runs, labels: pd.Series, task: str) -> Optional[OutOfFoldSummary]:
    """Accuracy and AUC intervals of each subject's P(positive) averaged over repeats."""
    if task != "binary":
        return None
    prob = pd.concat([p["output"].astype(float) for p, _ in runs], axis=1).mean(axis=1)
    return out_of_fold_summary(labels.loc[prob.index].to_numpy(), prob.to_numpy(), len(runs))


# -- files ------------------------------------------------------------------------------
def _write_json(path: Path, data) -> None:
    try:
        write_json(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _write_tsv(path: Path, table: pd.DataFrame,
               column_descriptions: Optional[dict] = None) -> None:
    try:
        write_tsv(path, table, column_descriptions)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _write_subject_predictions(output_dir: Path, subject_id: str, rows: pd.DataFrame
                               ) -> None:
    """Merge this model's row into ``sub-X/func/sub-X_desc-finetune_predictions.tsv``."""
    path = derivative_path(output_dir, {"sub": subject_id.removeprefix("sub-")},
                           suffix="predictions", extension=".tsv", desc="finetune")
    table = rows
    if path.is_file():
        old = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        old = old[~old["model"].isin(set(rows["model"]))]
        table = pd.concat([old, rows.astype(object)], ignore_index=True)
    _write_tsv(path, table, {c: PREDICTION_COLUMNS.get(
        c, f"Probability of class {c.removeprefix('probability_')}") for c in table.columns})


def _save_finetuned(path: Path, classifier: Classifier, cfg, geometry, pre_meta: ModelMeta,
                    info: dict, summary: dict, fold_models: Sequence = (),
                    trained_subjects: Sequence[str] = ()) -> None:
    head_kind = cfg.finetune.head if cfg.finetune.strategy != "linear-probe" else "linear"
    meta = ModelMeta(
        kind="finetune", atlas=pre_meta.atlas, label_info=label_attrs(info),
        head=HeadSpec(head_kind, int(classifier.feature_mean.numel()),
                      n_outputs(info["task_type"], len(info.get("classes", [])) or 2)),
        strategy=cfg.finetune.strategy, pretrained=summary["pretrained"],
        pretrained_kind=pre_meta.kind, cv_metrics=summary["metrics"],
        out_of_fold=summary["out_of_fold"] or {},
        trained_subjects=tuple(str(s) for s in trained_subjects))
    try:
        save_checkpoint(path, model=classifier, cfg=cfg, geometry=geometry, meta=meta,
                        fold_models=fold_models)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


# -- prediction -------------------------------------------------------------------------
def predict_subject(classifier: Classifier, entries: Sequence, cfg, device="cpu") -> dict:
    """Predict one subject from its prepared runs (no label needed).

    Parameters
    ----------
    classifier : Classifier
        A fine-tuned model (:func:`bids_roimae.io.checkpoint.load_model`).
    entries : sequence of CacheEntry
        Runs of a single subject.
    cfg : AppConfig
        ``geometry.window`` and ``finetune.windows_per_run``/``batch_size`` (use the
        configuration stored with the model).

    Returns
    -------
    dict
        ``prediction`` (class index or value), ``label`` (class name), ``probability``
        (P(positive) for binary, of the predicted class for multi-class, None for
        regression), ``probabilities`` ({class: p}), ``embedding`` (D,) mean window
        embedding, ``n_windows``, ``window_logits`` (K, C).
    """
    subjects = sorted({str(e.subject) for e in entries})
    if len(subjects) != 1:
        raise ValueError(f"predict_subject needs the runs of one subject, got {subjects}")
    refs = subject_windows(entries, cfg.geometry.window, cfg.finetune.windows_per_run)
    if not refs:
        raise BadDataError(f"sub-{subjects[0]}: no run has {cfg.geometry.window} frames "
                           f"(one window)")
    refs = refs[subjects[0]]
    classifier = classifier.to(device).eval()
    logits, emb = window_logits(classifier, refs, cfg.geometry.window,
                                cfg.finetune.batch_size, device)
    return subject_prediction(classifier, logits, emb)


def subject_prediction(classifier: Classifier, logits: np.ndarray, embeddings: np.ndarray
                       ) -> dict:
    """A subject's prediction from its window logits (K, C) and embeddings (K, D).

    Returns the dict :func:`predict_subject` documents.
    """
    info = classifier.label_info
    output = subject_output(logits, classifier.task_type)
    decoded = decode_output(output, info)
    result = {"embedding": np.asarray(embeddings).mean(axis=0), "n_windows": len(logits),
              "window_logits": logits}
    if classifier.task_type == "regression":
        return dict(result, prediction=decoded["predicted_value"], label=None,
                    probability=None, probabilities={})
    classes = list(info["classes"])
    probs = [1.0 - float(output), float(output)] if classifier.task_type == "binary" \
        else [float(p) for p in output]
    return dict(result, prediction=classes.index(decoded["predicted_label"]),
                label=decoded["predicted_label"], probability=decoded["probability"],
                probabilities=dict(zip(classes, probs)))

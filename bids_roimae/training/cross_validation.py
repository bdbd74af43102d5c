"""Honest cross-validation of one fine-tuning strategy over subjects.

Inputs (labels aligned with prepared runs, windows cut per subject), the frozen window
embeddings of the pretrained encoder, fitting one classifier on a set of training
subjects (also the refit on all of them), and out-of-fold predictions with per-fold
metrics. The participant-level workflow that uses them is in :mod:`bids_roimae.training.finetune`.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd

from bids_roimae.analysis.evaluation import FoldRecorder
from bids_roimae.analysis.labels import align_labels, label_attrs
from bids_roimae.errors import BadDataError
from bids_roimae.model.classifier import Classifier, subject_output
from bids_roimae.training.classifier_fit import (
    fit_linear_probe,
    probe_classifier,
    train_classifier,
    window_logits,
)
from bids_roimae.training.windows import embed_windows, subject_windows

log = logging.getLogger(__name__)


def fit_classifier(encoder, strategy, subjects, y, refs, emb, cfg, label_info, device,
                   seed) -> Classifier:
    """Fit one model of ``strategy`` on the given (training) subjects."""
    if strategy == "linear-probe":
        features = np.stack([emb[s].mean(axis=0) for s in subjects])
        probe = fit_linear_probe(features, y, label_info["task_type"], seed)
        log.debug("linear probe penalty %.3g", probe["penalty"])
        return probe_classifier(encoder, probe, label_info).to(device)
    window_refs = [r for s in subjects for r in refs[s]]
    window_y = np.concatenate([np.full(len(refs[s]), v) for s, v in zip(subjects, y)])
    window_emb = np.concatenate([emb[s] for s in subjects])
    return train_classifier(encoder, window_refs, window_y, cfg, label_info, device,
                            seed=seed, window_embeddings=window_emb)


def _predict(classifier, subjects, refs, emb, cfg, device, frozen: bool) -> list:
    out = []
    for s in subjects:
        logits, _ = window_logits(classifier, refs[s], cfg.geometry.window,
                                  cfg.finetune.batch_size, device,
                                  embeddings=emb[s] if frozen else None)
        out.append(subject_output(logits, classifier.task_type))
    return out


def cross_validate(encoder, labels: pd.Series, refs: dict, cfg, label_info: dict, folds,
                   device, emb: Optional[dict] = None, fold_models: Optional[list] = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold predictions and per-fold metrics of one strategy.

    Parameters
    ----------
    encoder : nn.Module
        Pretrained encoder with ``embed``.
    labels : Series, shape (S,)
        Label per subject (index: subject label), in the order the folds index.
    refs : dict
        ``{subject: [(entry, start), ...]}`` windows per subject.
    cfg : AppConfig
        Merged configuration (``geometry.window``, ``finetune.*``, ``seed``).
    folds : list of (train_idx, test_idx)
        Subject indices into ``labels``.
    emb : dict, optional
        ``{subject: (K_s, D)}`` frozen window embeddings (computed when omitted).
    fold_models : list, optional
        When given, each fold's ``(test subjects, fitted Classifier)`` is appended, so a
        caller can keep the models that never saw their test subjects (out-of-fold
        attribution).

    Returns
    -------
    predictions : DataFrame
        One row per subject: ``fold``, ``y_true``, ``output`` (P(positive), the class
        probabilities or the predicted value), ``n_windows``.
    fold_table : DataFrame
        :func:`~bids_roimae.analysis.evaluation.summarise_folds` table.
    """
    strategy, task = cfg.finetune.strategy, label_info["task_type"]
    subjects = list(labels.index)
    y = labels.to_numpy()
    if emb is None:
        emb = frozen_embeddings(encoder, refs, cfg, device)
    record = FoldRecorder(task, y)
    for k, (train, test) in enumerate(folds):
        model = fit_classifier(encoder, strategy, [subjects[i] for i in train], y[train], refs, emb,
                     cfg, label_info, device, seed=cfg.seed + 1009 * (k + 1))
        pred = _predict(model, [subjects[i] for i in test], refs, emb, cfg, device,
                        frozen=strategy != "full")
        if fold_models is not None:
            fold_models.append(([str(subjects[i]) for i in test], model))
        record.add(train, test, pred, len(folds))
    return record.results(folds, [len(refs[s]) for s in subjects], subjects)


def frozen_embeddings(encoder, refs: dict, cfg, device) -> dict:
    """``{subject: (K_s, D)}`` window embeddings of the (frozen) pretrained encoder."""
    return {s: embed_windows(encoder, r, cfg.geometry.window, cfg.finetune.batch_size,
                             device) for s, r in refs.items()}


def prepare_inputs(entries, labels: pd.Series, cfg, groups: Optional[pd.Series] = None,
                   label_info: Optional[dict] = None):
    """Align labels with prepared runs and cut windows; returns what CV needs.

    Returns
    -------
    labels, refs, groups, label_info, counts
    """
    info = dict(label_attrs(dict(labels.attrs)) if label_info is None else label_info)
    info.setdefault("task_type", cfg.finetune.task_type)
    labels, entries, groups, counts = align_labels(labels, entries, groups)
    refs = subject_windows(entries, cfg.geometry.window, cfg.finetune.windows_per_run)
    too_short = [s for s in labels.index if s not in refs]
    if too_short:
        log.warning("%d subjects have no run as long as one window (skipped): %s",
                    len(too_short), ", ".join(too_short[:10]))
    keep = [s for s in labels.index if s in refs]
    if not keep:
        raise BadDataError(f"no labelled subject has a run of at least "
                           f"{cfg.geometry.window} frames")
    counts["too_short"] = too_short
    counts["counts"]["too_short"] = len(too_short)
    labels = labels.loc[keep]
    groups = None if groups is None else groups.loc[keep]
    return labels, refs, groups, info, counts

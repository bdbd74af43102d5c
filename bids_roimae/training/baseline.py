"""The built-in classical baseline, cross-validated on the foundation model's folds.

Per subject, region time series are read from the prepared token cache (means over each
region's own voxels), turned into a connectome plus regional SD, or the regional SD alone
(:func:`~bids_roimae.analysis.connectome.baseline_features`, fitted on the training
subjects of each fold), and classified by the same standardised logistic regression (ridge
for regression) as the linear probe, its penalty chosen by an inner CV on training
subjects only. :func:`cross_validate_baseline` returns what
:func:`~bids_roimae.training.cross_validation.cross_validate` returns, so every
comparison can treat the baseline as one more arm, named by its feature set
(``connectome`` or ``region-sd``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from bids_roimae.analysis.connectome import baseline_features, region_series, subject_features
from bids_roimae.analysis.evaluation import FoldRecorder
from bids_roimae.core.region_weights import present_regions, voxel_region_matrix
from bids_roimae.errors import BadDataError
from bids_roimae.model.classifier import subject_output
from bids_roimae.training.classifier_fit import fit_linear_probe

log = logging.getLogger(__name__)

#: What each baseline's features are, for summaries.
BASELINE_DESCRIPTIONS = {
    "connectome": "voxel-exact atlas region means from the token cache -> connectivity "
                  "(upper triangle) + region SD -> standardised logistic regression (ridge "
                  "for regression), C by inner CV",
    "region-sd": "voxel-exact atlas region means from the token cache -> region SD -> "
                 "standardised logistic regression (ridge for regression), C by inner CV",
}


def cache_region_series(entries: Sequence, geometry) -> dict[str, list[np.ndarray]]:
    """``{subject: [(T, R) per run]}``: voxel-exact region means of every prepared run.

    Regions are every atlas region with a brain voxel in the geometry (ascending index).
    """
    regions = present_regions(geometry.labels, geometry.voxel_mask)
    matrix = voxel_region_matrix(geometry.labels, geometry.voxel_mask, regions)
    out: dict[str, list] = {}
    for entry in entries:
        tokens = entry.tokens()
        # One run at a time, a block of frames at a time: bounded memory for long runs.
        series = np.concatenate([region_series(np.asarray(tokens[t:t + 64]), matrix)
                                 for t in range(0, tokens.shape[0], 64)])
        out.setdefault(str(entry.subject), []).append(series)
    return out


def cross_validate_baseline(series: dict, labels: pd.Series, label_info: dict, folds,
                            *, features: str = "connectome", kind: str = "correlation",
                            seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold predictions and per-fold metrics of the classical baseline.

    Parameters
    ----------
    series : dict
        ``{subject: [(T, R) per run]}`` (:func:`cache_region_series`).
    labels : Series, shape (S,)
        Label per subject (index: subject label), in the order the folds index.
    label_info : dict
        ``task_type`` (and the class mapping).
    folds : list of (train_idx, test_idx)
        The foundation model's folds (indices into ``labels``).
    features : {"connectome", "region-sd"}
        Connectivity plus region SD, or region SD alone.
    kind : {"correlation", "tangent"}
        Connectivity measure (``"connectome"`` only).
    seed : int
        Seeds the inner CV as the linear probe's (``seed + 1009 * (fold + 1)``).

    Returns
    -------
    predictions : DataFrame
        As :func:`~bids_roimae.training.cross_validation.cross_validate`: ``fold``,
        ``y_true``, ``output``, ``n_windows`` (here: frames of the subject's runs).
    fold_table : DataFrame
        :func:`~bids_roimae.analysis.evaluation.summarise_folds` table.

    Raises
    ------
    BadDataError
        A labelled subject has no prepared run, or a training set holds one class.
    """
    task = label_info["task_type"]
    subjects = [str(s) for s in labels.index]
    missing = [s for s in subjects if not series.get(s)]
    if missing:
        raise BadDataError(f"{features} baseline: no prepared run for sub-{missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    y = labels.to_numpy()
    runs = [r for s in subjects for r in series[s]]
    owners = [s for s in subjects for _ in series[s]]
    record = FoldRecorder(task, y, "baseline fold")
    for k, (train, test) in enumerate(folds):
        train_subjects = [subjects[i] for i in train]
        if task != "regression" and np.unique(y[train]).size < 2:
            raise BadDataError(f"{features} baseline: fold {k} trains on one class only; "
                               "a classifier needs both")
        train_runs = [r for r, o in zip(runs, owners) if o in set(train_subjects)]
        measure = baseline_features(features, kind).fit(train_runs)
        x = subject_features(measure.transform(runs), owners, subjects)
        probe = fit_linear_probe(x[train], y[train], task, seed + 1009 * (k + 1))
        z = (x[test] - probe["mean"]) / probe["scale"]
        logits = z @ probe["weight"].T + probe["bias"]
        record.add(train, test, [subject_output(row[None, :], task) for row in logits],
                   len(folds))
    return record.results(folds, [int(sum(r.shape[0] for r in series[s])) for s in subjects],
                          labels.index)

"""Subject-level cross-validation folds and the metrics reported for fine-tuned models.

Folds are drawn over **subjects**, never over windows or runs: every window of every run
and session of a subject falls on the same side of a split, so a model is never tested on
a subject it saw in training.

* no groups: stratified k-fold (k-fold for regression), shuffled with the given seed;
* ``groups`` (``--cv-group site``): leave-one-group-out, so each fold tests on one whole
  group (site) that training never saw; ``--folds`` is then not used.

Class counts: a class with fewer than two subjects cannot be cross-validated at all (bad
data, exit 65); a class with fewer subjects than ``--folds`` can, with fewer folds (usage
error, exit 64, whose message names the largest usable ``--folds``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from bids_roimae.analysis.statistics import Interval, auc_interval, wilson_interval
from bids_roimae.errors import BadDataError, UsageError

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1", "sensitivity",
                          "specificity")
MULTICLASS_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1")
REGRESSION_METRICS = ("mae", "r2", "pearson_r")


def metric_names(task_type: str) -> tuple[str, ...]:
    """Metrics reported for a task type, in table order."""
    return {"binary": CLASSIFICATION_METRICS, "multiclass": MULTICLASS_METRICS,
            "regression": REGRESSION_METRICS}[task_type]


def make_folds(y: np.ndarray, n_folds: int, seed: int, task_type: str = "binary",
               groups: Optional[Sequence] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split subjects into train/test index sets.

    Parameters
    ----------
    y : ndarray, shape (S,)
        One label per subject (class index or float target).
    n_folds : int
        Number of folds without groups.
    seed : int
        Seed of the shuffle (same seed, same folds).
    task_type : {"binary", "multiclass", "regression"}
    groups : sequence, shape (S,), optional
        Group of each subject: leave-one-group-out.

    Returns
    -------
    list of (train_idx, test_idx)
        Sorted subject indices; each subject is in exactly one test set.

    Raises
    ------
    BadDataError
        A class has fewer than two subjects; a leave-group-out training set lacks a class.
    UsageError
        A class has fewer subjects than ``n_folds``; fewer than two groups.
    """
    from sklearn.model_selection import KFold, LeaveOneGroupOut, StratifiedKFold

    y = np.asarray(y)
    classify = task_type != "regression"
    if groups is not None:
        groups = np.asarray([str(g) for g in groups])
        if groups.shape != y.shape:
            raise ValueError(f"groups {groups.shape} and labels {y.shape} differ in length")
        names = np.unique(groups)
        if names.size < 2:
            raise UsageError(f"--cv-group holds {names.size} group(s) among the labelled "
                             f"subjects; leave-group-out needs at least two")
        splits = list(LeaveOneGroupOut().split(np.zeros(y.size), y, groups))
        if classify:
            n_classes = np.unique(y).size
            for train, test in splits:
                if np.unique(y[train]).size < n_classes:
                    raise BadDataError(
                        f"leaving out group {_plain(groups[test[0]])!r} leaves a training set "
                        f"without every class; choose another --cv-group")
    else:
        if n_folds < 2:
            raise UsageError("--folds must be at least 2")
        if classify:
            _check_class_counts(y, n_folds)
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        else:
            if y.size < n_folds:
                raise UsageError(f"{y.size} labelled subjects are fewer than --folds {n_folds}")
            splitter = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(y.size), y))
    return [(np.sort(tr), np.sort(te)) for tr, te in splits]


def _plain(value):
    """A numpy scalar as the Python value it holds (messages print ``0``, not
    ``np.int64(0)``)."""
    return value.item() if isinstance(value, np.generic) else value


def make_repeated_folds(y: np.ndarray, n_folds: int, n_repeats: int, seed: int,
                        task_type: str = "binary", groups: Optional[Sequence] = None
                        ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``n_repeats`` independent shuffles of :func:`make_folds` (seeds ``seed + r``).

    One split of a small sample is noisy: which subjects share a test fold moves accuracy
    by several points. Repeating the stratified split and averaging (with the
    Nadeau-Bengio correction when testing, see :mod:`bids_roimae.analysis.statistics`)
    measures the model rather than the split. Leave-one-group-out has a single split, so
    ``groups`` gives one repeat whatever ``n_repeats`` is.

    Returns
    -------
    list of fold lists
        Repeat ``r``'s folds; repeat 0 equals ``make_folds(y, n_folds, seed, ...)``.
    """
    if n_repeats < 1:
        raise UsageError("--cv-repeats must be at least 1")
    if groups is not None:
        return [make_folds(y, n_folds, seed, task_type, groups)]
    return [make_folds(y, n_folds, seed + r, task_type) for r in range(n_repeats)]


def _check_class_counts(y: np.ndarray, n_folds: int) -> None:
    values, counts = np.unique(y, return_counts=True)
    smallest = int(counts.min())
    if smallest < 2:
        raise BadDataError(f"class {_plain(values[np.argmin(counts)])!r} has {smallest} labelled "
                           f"subject; cross-validation needs at least two per class")
    if smallest < n_folds:
        raise UsageError(f"the smallest class has {smallest} subjects, fewer than "
                         f"--folds {n_folds}; use --folds {smallest} or fewer")


def fold_assignment(folds: Sequence[tuple[np.ndarray, np.ndarray]], n_subjects: int
                    ) -> np.ndarray:
    """Fold number (0-based) in which each subject is tested, shape (S,)."""
    out = np.full(n_subjects, -1, dtype=np.int64)
    for k, (_, test) in enumerate(folds):
        out[test] = k
    return out


# -- metrics ------------------------------------------------------------------------------
def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks); NaN for one class."""
    from scipy.stats import rankdata

    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, float))
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy, ROC AUC, F1, sensitivity, specificity.

    Parameters
    ----------
    y_true : ndarray of {0, 1}, shape (S,)
    prob : ndarray, shape (S,)
        Probability of the positive class.
    threshold : float
        Predicted positive when ``prob >= threshold``.

    Undefined values (sensitivity without positives, AUC with one class) are NaN.
    """
    y_true = np.asarray(y_true).astype(int)
    pred = (np.asarray(prob, float) >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y_true == 1)))
    tn = int(np.sum((pred == 0) & (y_true == 0)))
    fp = int(np.sum((pred == 1) & (y_true == 0)))
    fn = int(np.sum((pred == 0) & (y_true == 1)))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    present = [v for v in (sens, spec) if not np.isnan(v)]
    return {"accuracy": (tp + tn) / max(y_true.size, 1),
            "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
            "roc_auc": roc_auc(y_true, prob), "f1": float(f1),
            "sensitivity": float(sens), "specificity": float(spec)}


def multiclass_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest ROC AUC and macro F1.

    ``proba`` has shape (S, C); classes absent from ``y_true`` are left out of the macro
    averages of recall and AUC (as a fold may lack a rare class).
    """
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, float)
    pred = proba.argmax(axis=1)
    recalls, aucs, f1s = [], [], []
    for c in range(proba.shape[1]):
        truth, guess = y_true == c, pred == c
        tp = int(np.sum(truth & guess))
        denom = int(truth.sum()) + int(guess.sum())
        if truth.any():
            recalls.append(tp / truth.sum())
            auc = roc_auc(truth, proba[:, c])
            if not np.isnan(auc):
                aucs.append(auc)
        if denom:
            f1s.append(2 * tp / denom)
    return {"accuracy": float(np.mean(pred == y_true)),
            "balanced_accuracy": float(np.mean(recalls)),
            "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
            "f1": float(np.mean(f1s)) if f1s else 0.0}


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict:
    """Mean absolute error, coefficient of determination and Pearson correlation."""
    y_true, pred = np.asarray(y_true, float), np.asarray(pred, float)
    resid = y_true - pred
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    if y_true.size > 1 and np.std(pred) > 0 and np.std(y_true) > 0:
        r = float(np.corrcoef(y_true, pred)[0, 1])
    else:
        r = float("nan")
    return {"mae": float(np.mean(np.abs(resid))), "r2": r2, "pearson_r": r}


def compute_metrics(task_type: str, y_true: np.ndarray, output: np.ndarray) -> dict:
    """Dispatch on the task: ``output`` is P(positive) (S,), class probabilities (S, C)
    or predicted values (S,)."""
    if task_type == "binary":
        return binary_metrics(y_true, output)
    if task_type == "multiclass":
        return multiclass_metrics(y_true, output)
    return regression_metrics(y_true, output)


def summarise_folds(fold_metrics: Sequence[dict], task_type: str) -> pd.DataFrame:
    """Per-fold metric table followed by ``mean`` and ``sd`` rows.

    Parameters
    ----------
    fold_metrics : sequence of dict
        One dict per fold with the metrics of :func:`metric_names` and optionally
        ``n_test``.

    Returns
    -------
    DataFrame
        Index ``fold`` = ``"0", "1", ..., "mean", "sd"``; SD is the sample SD over folds
        (NaN folds ignored).
    """
    names = list(metric_names(task_type))
    extra = [k for k in ("n_train", "n_test") if fold_metrics and k in fold_metrics[0]]
    table = pd.DataFrame([{k: m.get(k, np.nan) for k in extra + names} for m in fold_metrics])
    table.index = [str(i) for i in range(len(table))]
    mean = table[names].mean(axis=0, skipna=True)
    sd = table[names].std(axis=0, ddof=1, skipna=True)
    table.loc["mean", names] = mean
    table.loc["sd", names] = sd
    table.index.name = "fold"
    return table


def mean_sd(table: pd.DataFrame) -> dict:
    """``{metric: {"mean": m, "sd": s}}`` from a :func:`summarise_folds` table."""
    out = {}
    for col in table.columns:
        if col in ("n_train", "n_test", "repeat"):
            continue
        out[col] = {"mean": _float(table.loc["mean", col]), "sd": _float(table.loc["sd", col])}
    return out


def _float(value) -> Optional[float]:
    value = float(value)
    return None if np.isnan(value) else value


# -- is the classifier above chance? -------------------------------------------------------
#: What every attribution table and report says when the classifier is not above chance.
CHANCE_WARNING = ("The classifier is not above chance out of fold (the AUC interval "
                  "includes 0.5): its attributions are not evidence of what drives the "
                  "diagnosis.")


@dataclass(frozen=True)
class OutOfFoldSummary:
    """How well a classifier predicts participants it never trained on (binary targets).

    Attributes
    ----------
    n_subjects : int
    n_repeats : int
        Cross-validation repeats whose out-of-fold probabilities were averaged.
    accuracy : Interval
        Accuracy of the averaged probability at 0.5, with its Wilson interval.
    roc_auc : Interval
        ROC AUC with DeLong's interval.
    baseline_name : str, optional
    baseline : OutOfFoldSummary, optional
        The same for a baseline on the same folds, shown beside the model.
    """

    n_subjects: int
    n_repeats: int
    accuracy: Interval
    roc_auc: Interval
    baseline_name: Optional[str] = None
    baseline: Optional["OutOfFoldSummary"] = None

    @property
    def above_chance(self) -> bool:
        """Whether the AUC interval lies above 0.5."""
        return bool(self.roc_auc.low > 0.5)

    def headline(self) -> str:
        """One line: accuracy and AUC with their 95% intervals."""
        def fmt(i: Interval) -> str:
            return f"{i.estimate:.2f} [{i.low:.2f}, {i.high:.2f}]"

        text = (f"out-of-fold accuracy {fmt(self.accuracy)}, ROC AUC {fmt(self.roc_auc)} "
                f"(95% intervals; {self.n_subjects} participants, {self.n_repeats} CV "
                f"repeats averaged)")
        if self.baseline is not None:
            text += (f"; {self.baseline_name or 'baseline'}: accuracy "
                     f"{fmt(self.baseline.accuracy)}, ROC AUC {fmt(self.baseline.roc_auc)}")
        return text

    def to_dict(self) -> dict:
        out = {"n_subjects": self.n_subjects, "n_repeats": self.n_repeats,
               "accuracy": self.accuracy.to_dict(), "roc_auc": self.roc_auc.to_dict(),
               "above_chance": self.above_chance}
        if self.baseline is not None:
            out.update(baseline_name=self.baseline_name, baseline=self.baseline.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> Optional["OutOfFoldSummary"]:
        """The summary stored by :meth:`to_dict`; None for an empty or missing one."""
        if not data or "roc_auc" not in data:
            return None
        return cls(int(data["n_subjects"]), int(data.get("n_repeats", 1)),
                   Interval(**data["accuracy"]), Interval(**data["roc_auc"]),
                   data.get("baseline_name"), cls.from_dict(data.get("baseline")))


def evidence_sidecar(evidence: Optional[OutOfFoldSummary]) -> dict:
    """The JSON entries that open every attribution output: is the classifier any good?"""
    if evidence is None:
        return {"ClassifierOutOfFold": "not available (no out-of-fold evaluation of a "
                                       "binary target stored with the model)"}
    out = {"ClassifierOutOfFold": evidence.headline(),
           "ClassifierAboveChance": evidence.above_chance}
    if not evidence.above_chance:
        out["Warning"] = CHANCE_WARNING
    return out


def out_of_fold_summary(y_true: np.ndarray, prob: np.ndarray, n_repeats: int = 1
                        ) -> OutOfFoldSummary:
    """Accuracy (Wilson) and AUC (DeLong) intervals of out-of-fold P(positive).

    Parameters
    ----------
    y_true : ndarray of {0, 1}, shape (S,)
    prob : ndarray, shape (S,)
        Each subject's out-of-fold probability (averaged over repeats).
    n_repeats : int
        Recorded for the report.
    """
    y_true = np.asarray(y_true).astype(int)
    correct = int(np.sum((np.asarray(prob, float) >= 0.5) == (y_true == 1)))
    return OutOfFoldSummary(int(y_true.size), int(n_repeats),
                            wilson_interval(correct, int(y_true.size)),
                            auc_interval(y_true, prob))


# -- readable prediction tables ----------------------------------------------------------
PREDICTION_COLUMNS = {
    "participant_id": "Participant label", "model": "Fine-tuned model (models/<name>)",
    "target": "participants.tsv column predicted",
    "fold": "Cross-validation fold in which the participant was tested (0-based)",
    "n_windows": "Windows averaged into the participant's prediction",
    "true_label": "Observed class", "predicted_label": "Out-of-fold predicted class",
    "probability": "Out-of-fold probability of the positive class (binary) or of the "
                   "predicted class (multi-class)",
    "true_value": "Observed value", "predicted_value": "Out-of-fold predicted value",
}


def prediction_rows(predictions: pd.DataFrame, info: dict, model: str) -> pd.DataFrame:
    """Readable out-of-fold table: true and predicted labels, probabilities."""
    rows = []
    for subject, r in predictions.iterrows():
        row = {"participant_id": f"sub-{subject}", "model": model,
               "target": info.get("target"), "fold": int(r["fold"]),
               "n_windows": int(r["n_windows"])}
        row.update(decode_output(r["output"], info, true=r["y_true"]))
        rows.append(row)
    return pd.DataFrame(rows)


def decode_output(output, info: dict, true=None) -> dict:
    """Turn a subject output into labelled columns (true label added when given)."""
    task, classes = info["task_type"], list(info.get("classes", []))
    out = {}
    if task == "regression":
        if true is not None:
            out["true_value"] = float(true)
        out["predicted_value"] = float(output)
        return out
    if task == "binary":
        prob = float(output)
        probs = [1.0 - prob, prob]
    else:
        probs = [float(p) for p in np.asarray(output)]
    pred = int(np.argmax(probs)) if task == "multiclass" else int(prob >= 0.5)
    if true is not None:
        out["true_label"] = str(classes[int(true)])
    out["predicted_label"] = str(classes[pred])
    out["probability"] = prob if task == "binary" else probs[pred]
    if task == "multiclass":
        out.update({f"probability_{c}": p for c, p in zip(classes, probs)})
    return out


class FoldRecorder:
    """Out-of-fold outputs and per-fold metrics of one cross-validated arm, fold by fold.

    Every arm (a fine-tuned encoder, the connectome baseline) records its folds the same
    way, so their prediction tables and fold tables line up.
    """

    def __init__(self, task_type: str, y: np.ndarray, name: str = "fold"):
        self.task_type, self.y, self.name = task_type, np.asarray(y), name
        self.outputs: list = [None] * len(self.y)
        self.fold_metrics: list[dict] = []

    def add(self, train: np.ndarray, test: np.ndarray, pred: Sequence, n_folds: int
            ) -> dict:
        """Store one fold's predictions for its ``test`` subjects; returns its metrics."""
        for i, p in zip(test, pred):
            self.outputs[i] = p
        metrics = compute_metrics(self.task_type, self.y[test], np.stack(pred))
        self.fold_metrics.append(dict(metrics, n_train=int(train.size),
                                      n_test=int(test.size)))
        logging.getLogger(__name__).info(
            "%s %d/%d: %s", self.name, len(self.fold_metrics), n_folds,
            ", ".join(f"{m} {v:.3f}" for m, v in metrics.items()))
        return metrics

    def results(self, folds, n_windows: Sequence[int], index: pd.Index
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(predictions, fold_table)``: one row per subject (``fold``, ``y_true``,
        ``output``, ``n_windows``) and :func:`summarise_folds`."""
        predictions = pd.DataFrame({
            "fold": fold_assignment(folds, len(self.y)), "y_true": self.y,
            "output": self.outputs, "n_windows": list(n_windows)},
            index=pd.Index(index, name="participant"))
        return predictions, summarise_folds(self.fold_metrics, self.task_type)

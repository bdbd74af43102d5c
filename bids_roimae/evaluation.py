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

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .errors import BadDataError, UsageError

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
                        f"leaving out group {groups[test[0]]!r} leaves a training set "
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


def _check_class_counts(y: np.ndarray, n_folds: int) -> None:
    values, counts = np.unique(y, return_counts=True)
    smallest = int(counts.min())
    if smallest < 2:
        raise BadDataError(f"class {values[np.argmin(counts)]!r} has {smallest} labelled "
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
        if col in ("n_train", "n_test"):
            continue
        out[col] = {"mean": _float(table.loc["mean", col]), "sd": _float(table.loc["sd", col])}
    return out


def _float(value) -> Optional[float]:
    value = float(value)
    return None if np.isnan(value) else value


# -- paired comparison of pretrained models (e.g. ROI vs random masking) -----------------
def compare_masking(models: dict, entries, labels: pd.Series, cfg, out_dir, device="cpu", *,
                    groups: Optional[pd.Series] = None, label_info: Optional[dict] = None
                    ) -> dict:
    """Fine-tune several pretrained models on the same folds and compare them pairwise.

    Parameters
    ----------
    models : dict
        ``{name: pretrained checkpoint path}``; the first is the reference that the
        others are compared with (e.g. ``{"random": ..., "roi": ...}``).
    entries : sequence of CacheEntry
        Prepared runs (the models must share the token geometry of the cache).
    labels : Series
        From :func:`~bids_roimae.labels.parse_labels`.
    cfg : AppConfig
        ``finetune`` settings and ``seed`` (architecture comes from each checkpoint).
    out_dir : path
        Folder for ``masking_comparison.{tsv,json,png}``, ``masking_tests.tsv`` and
        ``predictions_<name>.tsv``.
    groups : Series, optional
        CV group per subject (leave-one-group-out).

    Returns
    -------
    dict
        ``table`` (side by side: ``<metric>_<name>`` per fold plus mean/sd rows and
        ``<metric>_diff_<name>`` paired differences), ``tests`` (paired t-test and
        Wilcoxon per metric), ``folds`` (test subjects per fold), ``paths``.
    """
    from pathlib import Path

    from scipy import stats

    from . import finetune as ft

    if len(models) < 2:
        raise UsageError("compare_masking needs at least two pretrained models")
    out_dir = Path(out_dir)
    names = list(models)
    loaded = {n: ft.load_pretrained(p, device) for n, p in models.items()}
    run_cfgs = {n: ft.merged_config(loaded[n][1], cfg) for n in names}
    prepared = {n: ft.prepare_inputs(entries, labels, run_cfgs[n], groups, label_info)
                for n in names}
    # The same subjects for every model, so the folds (and the pairing) are identical.
    common = sorted(set.intersection(*(set(p[0].index) for p in prepared.values())))
    ref_labels, _, ref_groups, info, _ = prepared[names[0]]
    ref_labels = ref_labels.loc[common]
    task = info["task_type"]
    folds = make_folds(ref_labels.to_numpy(), cfg.finetune.folds, cfg.seed, task,
                       None if ref_groups is None else ref_groups.loc[common].to_numpy())
    per_model, tables = {}, {}
    for n in names:
        encoder, _, geometry, _ = loaded[n]
        ft.check_entries(list(entries), geometry)
        refs = prepared[n][1]
        per_model[n], tables[n] = ft.cross_validate(encoder, ref_labels, refs, run_cfgs[n],
                                                    info, folds, device)
    metrics = list(metric_names(task))
    side = pd.concat({n: tables[n][metrics] for n in names}, axis=1)
    side.columns = [f"{m}_{n}" for n, m in side.columns]
    rows, ref = [], names[0]
    n_folds = len(folds)
    for other in names[1:]:
        for m in metrics:
            a = tables[ref][m].iloc[:n_folds].to_numpy(float)
            b = tables[other][m].iloc[:n_folds].to_numpy(float)
            diff = b - a
            side.loc[side.index[:n_folds], f"{m}_diff_{other}"] = diff
            side.loc["mean", f"{m}_diff_{other}"] = np.nanmean(diff)
            side.loc["sd", f"{m}_diff_{other}"] = np.nanstd(diff, ddof=1)
            rows.append(dict(metric=m, model=other, reference=ref, n_folds=n_folds,
                             mean_difference=float(np.nanmean(diff)),
                             **_paired_tests(stats, a, b)))
    tests = pd.DataFrame(rows)
    paths = _write_comparison(out_dir, side, tests, per_model, names, metrics, tables,
                              n_folds, dict(info, models={n: str(p) for n, p in models.items()}))
    return {"table": side, "tests": tests, "paths": paths,
            "folds": [[str(ref_labels.index[i]) for i in te] for _, te in folds]}


def _paired_tests(stats, a: np.ndarray, b: np.ndarray) -> dict:
    """Paired t-test and Wilcoxon signed-rank over folds (NaN where undefined)."""
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    out = {"t": np.nan, "t_pvalue": np.nan, "wilcoxon": np.nan, "wilcoxon_pvalue": np.nan}
    if a.size >= 2 and np.std(b - a) > 0:
        res = stats.ttest_rel(b, a)
        out.update(t=float(res.statistic), t_pvalue=float(res.pvalue))
    if a.size >= 2 and np.any(b - a != 0):
        res = stats.wilcoxon(b, a)
        out.update(wilcoxon=float(res.statistic), wilcoxon_pvalue=float(res.pvalue))
    return out


def _write_comparison(out_dir, side, tests, per_model, names, metrics, tables, n_folds,
                      meta) -> dict:
    import json

    from .errors import OutputError

    paths = {"table": out_dir / "masking_comparison.tsv",
             "tests": out_dir / "masking_tests.tsv",
             "json": out_dir / "masking_comparison.json",
             "figure": out_dir / "masking_comparison.png"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        side.reset_index().to_csv(paths["table"], sep="\t", index=False, na_rep="n/a",
                                  float_format="%.6g")
        tests.to_csv(paths["tests"], sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        for n, pred in per_model.items():
            pred.assign(output=[np.asarray(o).tolist() for o in pred["output"]]).to_csv(
                out_dir / f"predictions_{n}.tsv", sep="\t", na_rep="n/a")
        summary = {"meta": meta, "metrics": {n: mean_sd(tables[n]) for n in names},
                   "tests": json.loads(tests.to_json(orient="records"))}
        paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _comparison_figure(paths["figure"], tables, names, metrics, n_folds)
    except OSError as exc:
        raise OutputError(f"cannot write the comparison into {out_dir}: {exc}") from exc
    return paths


def _comparison_figure(path, tables, names, metrics, n_folds) -> None:
    """One panel per metric: each fold's paired values (grey lines), mean ± SD (black)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6 * len(metrics), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(names))
    for ax, m in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        values = np.array([tables[n][m].iloc[:n_folds].to_numpy(float) for n in names])
        for fold in values.T:
            ax.plot(x, fold, color="0.7", marker="o", lw=1, ms=3)
        ax.errorbar(x, np.nanmean(values, axis=1), yerr=np.nanstd(values, axis=1, ddof=1),
                    color="black", marker="s", lw=2, capsize=4)
        ax.set_xticks(x, names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(m.replace("_", " "))
    fig.suptitle(f"Fine-tuning on the same {n_folds} folds")
    fig.savefig(path, dpi=120)

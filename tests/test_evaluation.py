"""Subject-level folds and fine-tuning metrics."""

import numpy as np
import pytest
from sklearn import metrics as skm

from bids_roimae.analysis.evaluation import (
    binary_metrics,
    fold_assignment,
    make_folds,
    mean_sd,
    multiclass_metrics,
    regression_metrics,
    summarise_folds,
)
from bids_roimae.errors import BadDataError, UsageError


def test_stratified_folds_partition_subjects_and_keep_class_balance():
    y = np.array([0] * 12 + [1] * 8)
    folds = make_folds(y, 4, seed=3)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested) == list(range(20))  # every subject tested exactly once
    for train, test in folds:
        assert not set(train) & set(test)
        assert len(train) + len(test) == 20
        assert y[test].sum() == 2  # 8 positives over 4 folds
    again = make_folds(y, 4, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = make_folds(y, 4, seed=4)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    assert list(fold_assignment(folds, 20)).count(0) == len(folds[0][1])


def test_windows_of_a_subject_never_straddle_a_split():
    # Subjects have several runs and sessions; windows inherit their subject's fold.
    rng = np.random.default_rng(0)
    subjects = [f"{i:02d}" for i in range(15)]
    y = np.array([i % 3 == 0 for i in range(15)], int)
    window_subject = np.repeat(np.arange(15), rng.integers(2, 9, size=15))
    for train, test in make_folds(y, 5, seed=0):
        train_windows = np.flatnonzero(np.isin(window_subject, train))
        test_windows = np.flatnonzero(np.isin(window_subject, test))
        assert not set(window_subject[train_windows]) & set(window_subject[test_windows])
        assert train_windows.size + test_windows.size == window_subject.size
    assert len(subjects) == 15


def test_leave_one_group_out_tests_each_site_alone():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1, 1])
    sites = np.array(["A", "A", "B", "B", "B", "C", "C", "C", "A"])
    folds = make_folds(y, 5, seed=0, groups=sites)
    assert len(folds) == 3
    for train, test in folds:
        assert len(set(sites[test])) == 1 and not set(sites[test]) & set(sites[train])
    with pytest.raises(UsageError):
        make_folds(y, 2, seed=0, groups=["A"] * 9)
    with pytest.raises(BadDataError):  # leaving site B out leaves no negative to train on
        make_folds(np.array([1, 1, 0, 0, 1]), 2, seed=0, groups=list("AABBA"))


def test_class_counts_against_folds():
    with pytest.raises(UsageError, match="--folds 3") as err:
        make_folds(np.array([0] * 10 + [1] * 3), 5, seed=0)
    assert err.value.exit_code == 64
    with pytest.raises(BadDataError) as err:
        make_folds(np.array([0] * 10 + [1]), 2, seed=0)
    assert err.value.exit_code == 65
    folds = make_folds(np.linspace(0, 1, 9), 3, seed=0, task_type="regression")
    assert sorted(np.concatenate([te for _, te in folds])) == list(range(9))


Y_TRUE = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1])
PROB = np.array([0.1, 0.6, 0.8, 0.4, 0.3, 0.9, 0.5, 0.2, 0.7, 0.55, 0.3, 0.65])


def test_binary_metrics_agree_with_scikit_learn():
    m = binary_metrics(Y_TRUE, PROB)
    pred = (PROB >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y_TRUE, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y_TRUE, PROB))
    assert m["f1"] == pytest.approx(skm.f1_score(Y_TRUE, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(Y_TRUE, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - Y_TRUE, 1 - pred))
    assert m["accuracy"] != m["balanced_accuracy"]  # unbalanced example: they differ
    ties = np.array([0.5, 0.5, 0.5, 0.2, 0.9, 0.5])
    y_ties = np.array([0, 1, 1, 0, 1, 0])
    assert binary_metrics(y_ties, ties)["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y_ties, ties))
    assert np.isnan(binary_metrics(np.ones(4), np.full(4, 0.7))["roc_auc"])


def test_multiclass_and_regression_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2])
    proba = rng.dirichlet(np.ones(3), size=y.size)
    m = multiclass_metrics(y, proba)
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"))
    truth = rng.normal(size=20)
    guess = truth + rng.normal(scale=0.5, size=20)
    r = regression_metrics(truth, guess)
    assert r["mae"] == pytest.approx(skm.mean_absolute_error(truth, guess))
    assert r["r2"] == pytest.approx(skm.r2_score(truth, guess))
    assert r["pearson_r"] == pytest.approx(np.corrcoef(truth, guess)[0, 1])


def test_fold_summary_has_mean_and_sample_sd():
    folds = [binary_metrics(Y_TRUE[i::3], PROB[i::3]) for i in range(3)]
    table = summarise_folds([dict(m, n_test=4) for m in folds], "binary")
    assert list(table.index) == ["0", "1", "2", "mean", "sd"]
    accs = [m["accuracy"] for m in folds]
    assert table.loc["mean", "accuracy"] == pytest.approx(np.mean(accs))
    assert table.loc["sd", "accuracy"] == pytest.approx(np.std(accs, ddof=1))
    summary = mean_sd(table)
    assert summary["roc_auc"]["mean"] == pytest.approx(table.loc["mean", "roc_auc"])
    assert "n_test" not in summary

"""The comparison statistics against values worked out by hand."""

import numpy as np
import pytest

from bids_roimae.analysis.evaluation import roc_auc
from bids_roimae.analysis.statistics import (
    auc_interval,
    corrected_resampled_ttest,
    delong_test,
    paired_bootstrap,
    wilson_interval,
)


def test_corrected_resampled_ttest_by_hand():
    # d = 0.1, 0.2, 0.3, 0.0: mean 0.15, sample variance 0.05 / 3; J = 4 splits with
    # 8 training and 2 test subjects: variance factor 1/4 + 2/8 = 0.5.
    res = corrected_resampled_ttest([0.1, 0.2, 0.3, 0.0], n_train=8, n_test=2)
    se = np.sqrt(0.5 * 0.05 / 3)  # 0.091287
    assert res.estimate == pytest.approx(0.15)
    assert res.high - res.estimate == pytest.approx(3.182446 * se, rel=1e-5)  # t_{3, .975}
    # t = 1.6432 on 3 df; the uncorrected paired t (2.3238) would give p = 0.103.
    assert res.p == pytest.approx(0.19888, abs=2e-4)
    assert res.includes_zero and res.n == 4


def test_corrected_test_is_wider_than_the_naive_one():
    rng = np.random.default_rng(0)
    d = rng.normal(0.05, 0.1, size=25)
    corrected = corrected_resampled_ttest(d, n_train=20, n_test=5)
    naive_half = 2.063899 * d.std(ddof=1) / np.sqrt(25)  # t_{24, .975}
    assert corrected.high - corrected.estimate > 1.5 * naive_half


def test_corrected_test_of_constant_differences():
    assert corrected_resampled_ttest([0.0] * 5, 8, 2).p == 1.0
    assert np.isnan(corrected_resampled_ttest([0.3], 8, 2).p)


def test_delong_by_hand():
    # Positives 0.9, 0.4 and negatives 0.5, 0.1 under A: AUC 3/4; B separates: AUC 1.
    # A's placements V10 = (1, 1/2), V01 = (1/2, 1), both with variance 1/8; B's are
    # constant, so var(AUC_B - AUC_A) = (1/8)/2 + (1/8)/2 = 1/8.
    y = [1, 1, 0, 0]
    a, b = [0.9, 0.4, 0.5, 0.1], [0.8, 0.7, 0.3, 0.2]
    res = delong_test(y, a, b)
    assert res.estimate == pytest.approx(0.25)
    assert res.high - res.estimate == pytest.approx(1.959964 * np.sqrt(1 / 8), rel=1e-6)
    assert res.p == pytest.approx(0.47950, abs=1e-4)  # z = 0.7071
    single = auc_interval(y, a)
    assert single.estimate == pytest.approx(0.75)
    assert single.low == pytest.approx(0.75 - 1.959964 * np.sqrt(1 / 8), rel=1e-6)
    assert single.high == 1.0 and single.includes(0.5)


def test_delong_matches_the_rank_auc_and_is_antisymmetric():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    a, b = rng.normal(size=40) + y, rng.normal(size=40) + 2 * y
    res, rev = delong_test(y, a, b), delong_test(y, b, a)
    assert res.estimate == pytest.approx(roc_auc(y, b) - roc_auc(y, a))
    assert rev.estimate == pytest.approx(-res.estimate) and rev.p == pytest.approx(res.p)


def test_wilson_interval_by_hand():
    res = wilson_interval(8, 10)  # the textbook 0.490 - 0.943
    assert (res.low, res.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert res.includes(0.5) and not wilson_interval(48, 50).includes(0.5)


def accuracy(y, p):
    return float(np.mean((np.asarray(p) >= 0.5) == y))


def test_paired_bootstrap_of_identical_and_of_better_models():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    a = rng.uniform(size=40)
    same = paired_bootstrap(y, a, a, accuracy, n_boot=200)
    assert (same.estimate, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    perfect = np.where(y == 1, 0.9, 0.1)
    better = paired_bootstrap(y, a, perfect, roc_auc, n_boot=300, seed=2)
    assert better.estimate == pytest.approx(1.0 - roc_auc(y, a))
    assert better.low > 0 and not better.includes_zero and better.p < 0.01
    # Stratified resampling keeps both classes, so AUC is defined in every resample.
    assert better.n == 40

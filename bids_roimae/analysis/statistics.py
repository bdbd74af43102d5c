"""Statistics for comparing classifiers evaluated by cross-validation (pure numpy/scipy).

Two complementary views of "is model B better than model A":

* over resamples: :func:`corrected_resampled_ttest`, the Nadeau-Bengio (2003) correction of
  the paired t-test over ``J`` train/test splits (repeated k-fold). Training sets of
  different folds overlap, so fold scores are correlated and the plain paired t-test
  underestimates the variance; the correction inflates it by ``n_test / n_train``.
* over subjects: :func:`delong_test` (the variance of a difference of two correlated AUCs,
  DeLong et al. 1988) and :func:`paired_bootstrap` (resampling subjects, stratified by
  class, for any metric, e.g. accuracy) on the out-of-fold predictions.

Each returns the difference with its 95% interval first and the p value second, the order
in which the app's tables report them. :func:`auc_interval` and :func:`wilson_interval`
give the single-model intervals used to decide whether a classifier is above chance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Difference:
    """A difference between two models with its 95% interval and test.

    Attributes
    ----------
    estimate : float
        Mean difference (B - A).
    low, high : float
        95% interval of the difference.
    p : float
        Two-sided p value of "no difference".
    method : str
        How the interval and p were obtained.
    n : int
        Resamples (splits) or subjects behind the estimate.
    """

    estimate: float
    low: float
    high: float
    p: float
    method: str
    n: int

    @property
    def includes_zero(self) -> bool:
        """Whether the interval contains 0 (NaN intervals count as containing it)."""
        return not (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Interval:
    """A single-model estimate with its 95% interval."""

    estimate: float
    low: float
    high: float
    method: str

    def includes(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval (NaN bounds count as inside)."""
        return not (self.low > value or self.high < value)

    def to_dict(self) -> dict:
        return asdict(self)


_NAN_DIFF = dict(estimate=float("nan"), low=float("nan"), high=float("nan"), p=float("nan"))


def corrected_resampled_ttest(differences, n_train: float, n_test: float,
                              confidence: float = 0.95) -> Difference:
    """Nadeau-Bengio corrected resampled t-test of per-split score differences.

    Parameters
    ----------
    differences : array-like, shape (J,)
        Score of B minus score of A on each of ``J`` train/test splits (e.g. 5 repeats x 5
        folds = 25); NaN splits are dropped.
    n_train, n_test : float
        Subjects in a training and a test set (the mean over splits when they vary).
    confidence : float
        Coverage of the interval.

    Returns
    -------
    Difference
        ``estimate`` = mean difference; the interval is
        ``mean ± t_{J-1} * sqrt((1/J + n_test/n_train) * var)`` with ``var`` the sample
        variance (ddof 1) of the differences; ``p`` from the t distribution with ``J - 1``
        degrees of freedom. All-equal differences give a zero-width interval and
        ``p = 1`` when they are all 0, else ``p = 0``.
    """
    d = np.asarray(differences, float)
    d = d[np.isfinite(d)]
    method = "Nadeau-Bengio corrected resampled t-test"
    if d.size < 2 or n_train <= 0:
        return Difference(**_NAN_DIFF, method=method, n=int(d.size))
    mean, var = float(d.mean()), float(d.var(ddof=1))
    se = np.sqrt((1.0 / d.size + n_test / n_train) * var)
    if se == 0:
        return Difference(mean, mean, mean, 1.0 if mean == 0 else 0.0, method, int(d.size))
    t = mean / se
    half = stats.t.ppf(0.5 + confidence / 2, d.size - 1) * se
    p = 2 * stats.t.sf(abs(t), d.size - 1)
    return Difference(mean, mean - half, mean + half, float(p), method, int(d.size))


def _structural_components(y_true: np.ndarray, scores: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong's placement values: AUC (M,), V10 (M, n_pos), V01 (M, n_neg) for M models."""
    pos, neg = scores[:, y_true], scores[:, ~y_true]
    # psi = 1 when the positive outranks the negative, 1/2 on a tie.
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    return psi.mean(axis=(1, 2)), psi.mean(axis=2), psi.mean(axis=1)


def _binary(y_true) -> Optional[np.ndarray]:
    y = np.asarray(y_true).astype(bool)
    return y if 0 < y.sum() < y.size else None


def auc_interval(y_true, score, confidence: float = 0.95) -> Interval:
    """ROC AUC with DeLong's normal-approximation interval (clipped to [0, 1]).

    NaN when a class is missing. The interval has zero width when every positive
    outranks every negative (DeLong's variance is then 0).
    """
    y = _binary(y_true)
    method = "DeLong"
    if y is None:
        return Interval(float("nan"), float("nan"), float("nan"), method)
    auc, v10, v01 = _structural_components(y, np.asarray(score, float)[None, :])
    var = v10[0].var(ddof=1) / v10.shape[1] + v01[0].var(ddof=1) / v01.shape[1]
    half = stats.norm.ppf(0.5 + confidence / 2) * np.sqrt(max(var, 0.0))
    return Interval(float(auc[0]), float(max(0.0, auc[0] - half)),
                    float(min(1.0, auc[0] + half)), method)


def delong_test(y_true, score_a, score_b, confidence: float = 0.95) -> Difference:
    """DeLong's test of two correlated ROC AUCs (the same subjects scored by A and B).

    Parameters
    ----------
    y_true : array-like of {0, 1}, shape (S,)
    score_a, score_b : array-like, shape (S,)
        Out-of-fold scores (e.g. P(positive)) of the two models.

    Returns
    -------
    Difference
        ``estimate`` = AUC(B) - AUC(A) with a normal-approximation interval and two-sided
        p; NaN when a class is missing.
    """
    y = _binary(y_true)
    method = "DeLong test of correlated AUCs"
    if y is None:
        return Difference(**_NAN_DIFF, method=method, n=int(np.size(y_true)))
    scores = np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)])
    auc, v10, v01 = _structural_components(y, scores)
    s10, s01 = np.cov(v10), np.cov(v01)
    contrast = np.array([-1.0, 1.0])
    var = contrast @ s10 @ contrast / v10.shape[1] + contrast @ s01 @ contrast / v01.shape[1]
    diff = float(auc[1] - auc[0])
    if var <= 0:
        return Difference(diff, diff, diff, 1.0 if diff == 0 else 0.0, method, int(y.size))
    se = float(np.sqrt(var))
    half = stats.norm.ppf(0.5 + confidence / 2) * se
    p = 2 * stats.norm.sf(abs(diff) / se)
    return Difference(diff, diff - half, diff + half, float(p), method, int(y.size))


def paired_bootstrap(y_true, output_a, output_b,
                     metric: Callable[[np.ndarray, np.ndarray], float], *,
                     n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                     stratify: bool = True) -> Difference:
    """Paired bootstrap over subjects of ``metric(y, B) - metric(y, A)``.

    Parameters
    ----------
    y_true : array-like, shape (S,)
    output_a, output_b : array-like, shape (S, ...)
        Out-of-fold outputs of the two models for the same subjects.
    metric : callable
        ``metric(y_true, output) -> float`` (e.g. accuracy of P(positive) >= 0.5).
    n_boot : int
        Bootstrap resamples.
    stratify : bool
        Resample within each class so every resample keeps the class counts (needed for
        AUC on small samples).

    Returns
    -------
    Difference
        ``estimate`` = the observed difference; the percentile interval of the resampled
        differences; ``p`` = two-sided bootstrap p of 0 (the smaller tail doubled, with
        the +1 correction so it is never 0).
    """
    y = np.asarray(y_true)
    a, b = np.asarray(output_a), np.asarray(output_b)
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(y.size)]
    observed = float(metric(y, b) - metric(y, a))
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(s, s.size, replace=True) for s in strata])
        diffs[i] = metric(y[idx], b[idx]) - metric(y[idx], a[idx])
    diffs = diffs[np.isfinite(diffs)]
    method = f"paired bootstrap over subjects ({n_boot} resamples)"
    if not diffs.size:
        return Difference(**_NAN_DIFF, method=method, n=int(y.size))
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    p = min(1.0, 2 * (min(np.sum(diffs <= 0), np.sum(diffs >= 0)) + 1) / (diffs.size + 1))
    return Difference(observed, float(low), float(high), float(p), method, int(y.size))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion (e.g. accuracy = correct / subjects)."""
    method = "Wilson"
    if n <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), method)
    z = stats.norm.ppf(0.5 + confidence / 2)
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(float(phat), float(centre - half), float(centre + half), method)


def spread(values) -> float:
    """Sample SD (ddof 1) of the finite values; NaN with fewer than two."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


__all__ = ["Difference", "Interval", "auc_interval", "corrected_resampled_ttest",
           "delong_test", "paired_bootstrap", "spread", "wilson_interval"]

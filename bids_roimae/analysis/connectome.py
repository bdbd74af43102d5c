"""The classical arms: a functional connectome plus regional fluctuation, or the regional
fluctuation alone (no file I/O).

What a user would build instead of a foundation model (nilearn's ``NiftiLabelsMasker`` ->
``ConnectivityMeasure`` -> logistic regression), computed from the same token cache the
model reads: region time series are means over each region's **own voxels**
(:func:`bids_roimae.core.region_weights.voxel_region_matrix`), features are the upper
triangle of the connectivity matrix (correlation, or tangent to the training subjects'
mean) and each region's signal SD. Tangent space depends on the group mean, so the
measure is fitted on training subjects only (:class:`ConnectomeFeatures`). The region SDs
alone (:class:`RegionSDFeatures`) are the stronger classical model when groups differ in
how much regions fluctuate: among R (R - 1) / 2 correlations they are diluted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bids_roimae.errors import BadDataError

CONNECTIVITY_KINDS = ("correlation", "tangent")
#: Feature sets of the built-in baseline (``--baseline``).
BASELINE_FEATURES = ("connectome", "region-sd")


def region_series(window: np.ndarray, matrix) -> np.ndarray:
    """Voxel-exact region means of tokens.

    Parameters
    ----------
    window : ndarray, shape (T, N, P)
        Token values (any frames of a run).
    matrix : sparse matrix, shape (N * P, R)
        From :func:`~bids_roimae.core.region_weights.voxel_region_matrix`.

    Returns
    -------
    ndarray, shape (T, R) float64
    """
    flat = np.asarray(window, np.float32).reshape(window.shape[0], -1)
    return np.asarray(matrix.T @ flat.T, np.float64).T


class ConnectomeFeatures:
    """Connectivity (upper triangle) and regional SD of each run, fitted on training runs.

    Parameters
    ----------
    kind : {"correlation", "tangent"}
    """

    def __init__(self, kind: str = "correlation"):
        if kind not in CONNECTIVITY_KINDS:
            raise ValueError(f"connectivity must be {' or '.join(CONNECTIVITY_KINDS)}")
        self.kind = kind
        self._measure = None

    def fit(self, runs: Sequence[np.ndarray]) -> "ConnectomeFeatures":
        """Fit the measure on training runs (each ``(T, R)``)."""
        from nilearn.connectome import ConnectivityMeasure
        from sklearn.covariance import LedoitWolf

        # Shrinkage: short runs have fewer frames than regions (a singular covariance).
        self._measure = ConnectivityMeasure(
            cov_estimator=LedoitWolf(store_precision=False), kind=self.kind, vectorize=True,
            discard_diagonal=True, standardize="zscore_sample")
        self._measure.fit([_checked(r) for r in runs])
        return self

    def transform(self, runs: Sequence[np.ndarray]) -> np.ndarray:
        """Features of runs, ``(n_runs, R * (R - 1) / 2 + R)``: connectivity, then SD."""
        if self._measure is None:
            raise RuntimeError("ConnectomeFeatures.fit must run first")
        runs = [_checked(r) for r in runs]
        return np.hstack([self._measure.transform(runs), region_sd(runs)])


class RegionSDFeatures:
    """Each region's signal SD per run; nothing to fit (the same interface as
    :class:`ConnectomeFeatures`)."""

    def fit(self, runs: Sequence[np.ndarray]) -> "RegionSDFeatures":
        """Check the training runs (each ``(T, R)``); no parameters are learned."""
        for run in runs:
            _checked(run)
        return self

    def transform(self, runs: Sequence[np.ndarray]) -> np.ndarray:
        """Features of runs, ``(n_runs, R)``."""
        return region_sd([_checked(r) for r in runs])


def baseline_features(features: str, kind: str = "correlation"):
    """An unfitted feature builder of the built-in baseline.

    Parameters
    ----------
    features : {"connectome", "region-sd"}
    kind : {"correlation", "tangent"}
        Connectivity measure (``"connectome"`` only).

    Returns
    -------
    ConnectomeFeatures or RegionSDFeatures
    """
    if features == "connectome":
        return ConnectomeFeatures(kind)
    if features == "region-sd":
        return RegionSDFeatures()
    raise ValueError(f"baseline features must be {' or '.join(BASELINE_FEATURES)}")


def region_sd(runs: Sequence[np.ndarray]) -> np.ndarray:
    """Across-time SD (ddof 1) of each region in each run, ``(n_runs, R)``."""
    return np.stack([np.asarray(r).std(axis=0, ddof=1) for r in runs])


def _checked(run: np.ndarray) -> np.ndarray:
    run = np.asarray(run, np.float64)
    if run.ndim != 2 or run.shape[0] < 3:
        raise BadDataError(f"a connectome needs at least 3 frames per run, got {run.shape}")
    if not np.isfinite(run).all():
        raise BadDataError("region time series hold NaN or inf values")
    return run


def subject_features(features: np.ndarray, owners: Sequence[str], subjects: Sequence[str]
                     ) -> np.ndarray:
    """Average run features per subject, in the order of ``subjects`` ``(S, F)``."""
    owners = np.asarray(list(owners))
    return np.stack([features[owners == s].mean(axis=0) for s in subjects])

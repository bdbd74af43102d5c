"""Signal scaling and temporal resampling of a run's ``(T, V)`` brain matrix (numpy only).

Both scalings demean every voxel over time. ``global`` keeps how strongly each voxel
fluctuates relative to the others (percent signal change, one scale per run);
``voxel`` z-scores every voxel. Work happens in place on float32 to hold one copy of a run.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import numpy as np


def demean_inplace(brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each column's mean over time, in place; returns (mean, SD), float64."""
    mean = brain.mean(axis=0, dtype=np.float64)
    brain -= mean.astype(np.float32)
    # einsum squares and sums without a (T, V) temporary.
    var = np.einsum("tv,tv->v", brain, brain, dtype=np.float64) / brain.shape[0]
    return mean, np.sqrt(var)


def zscore_inplace(brain: np.ndarray) -> int:
    """Z-score each column of ``brain`` (T, V) over time, in place.

    Columns with (numerically) zero variance become 0. Returns their count.
    """
    mean, std = demean_inplace(brain)
    flat = std <= 1e-6 * np.maximum(np.abs(mean), 1e-6)
    inv = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, std)).astype(np.float32)
    brain *= inv
    return int(flat.sum())


def global_scale_inplace(brain: np.ndarray, baseline: np.ndarray,
                         floor_fraction: float = 0.1, min_snr: float = 10.0,
                         ignore: Optional[np.ndarray] = None) -> dict:
    """Percent signal change per voxel, then one scale for the whole run, in place.

    Unlike a per-voxel z-score this keeps how strongly each voxel fluctuates relative to
    the others (a region with twice the fluctuation amplitude stays twice as large), while
    differences in scanner units between runs and sites are removed.

    Parameters
    ----------
    brain : numpy.ndarray
        ``(T, V)`` float32 time series of the brain voxels, modified in place.
    baseline : numpy.ndarray
        ``(V,)`` mean intensity of each voxel in the raw signal (before any confound
        regression, which may remove it).
    floor_fraction : float
        Baselines below this fraction of the median baseline (signal dropout, the edge of
        the field of view) are raised to it, so near-zero means cannot blow a voxel up.
    min_snr : float
        Percent signal change is used only when the median baseline exceeds ``min_snr``
        times the median temporal SD, i.e. when the input is raw positive intensities;
        otherwise (demeaned or standardised input) only the run-wide scale is applied.
    ignore : numpy.ndarray of bool, optional
        ``(V,)`` voxels left out of the medians (outside the participant's own brain mask,
        where the signal is background).

    Returns
    -------
    dict
        ``normalize`` (``"global-psc"`` or ``"global-sd"``), ``global_scale`` (what the
        demeaned signal was divided by), ``median_baseline``, ``n_zero_variance_voxels``.
    """
    _, sd = demean_inplace(brain)
    live = sd > 1e-6 * np.maximum(np.abs(baseline), 1e-6)
    counted = live if ignore is None else live & ~ignore
    counted = counted if counted.any() else live
    if not counted.any():  # nothing fluctuates: every voxel becomes 0
        brain[:] = 0.0
        return {"normalize": "global-sd", "global_scale": 1.0, "median_baseline": 0.0,
                "n_zero_variance_voxels": int(live.size)}
    median_base = float(np.median(baseline[counted]))
    median_sd = float(np.median(sd[counted]))
    psc = median_base > 0 and median_base > min_snr * median_sd
    if psc:
        per_voxel = 100.0 / np.maximum(baseline, floor_fraction * median_base)
        sd_scaled = sd * per_voxel
    else:
        per_voxel, sd_scaled = np.ones_like(sd), sd
    scale = float(np.median(sd_scaled[counted]))
    scale = scale if scale > 0 else 1.0
    factor = np.where(live, per_voxel / scale, 0.0).astype(np.float32)
    brain *= factor
    return {"normalize": "global-psc" if psc else "global-sd", "global_scale": scale,
            "median_baseline": median_base, "n_zero_variance_voxels": int((~live).sum())}


def resampled_length(n_frames: int, tr_in: float, tr_out: float) -> int:
    up, down = tr_ratio(tr_in, tr_out)
    return -(-n_frames * up // down)


def tr_ratio(tr_in: float, tr_out: float) -> tuple[int, int]:
    """``(up, down)`` polyphase factors taking TR ``tr_in`` to ``tr_out``."""
    ratio = Fraction(tr_in / tr_out).limit_denominator(64)
    return ratio.numerator, ratio.denominator


def resample_time(brain: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """Resample (T, V) from TR ``tr_in`` to ``tr_out`` with a polyphase anti-alias filter."""
    from scipy.signal import resample_poly

    up, down = tr_ratio(tr_in, tr_out)
    if up == down:
        return brain
    out = resample_poly(brain, up, down, axis=0, padtype="line")
    return np.ascontiguousarray(out, dtype=np.float32)

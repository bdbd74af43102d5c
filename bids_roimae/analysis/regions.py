"""Maps and region summaries: per-token values back to voxels, grids and atlas regions.

Maps go back to voxels with :func:`token_map` (model grid) and :func:`to_source_grid` (the
source BOLD's grid and affine); :func:`region_table` summarises a map per atlas region and
:func:`paint_regions` paints per-region scores. No file I/O: images are built in memory.
"""

from __future__ import annotations

from typing import Mapping, Optional

import nibabel as nib
import numpy as np
import pandas as pd

from bids_roimae.core.geometry import TokenGeometry


def token_map(geometry: TokenGeometry, values: np.ndarray, fill: float = 0.0):
    """Paint per-token ``(N,)`` or per-voxel ``(N, P)`` values onto the model grid.

    Returns
    -------
    nibabel.Nifti1Image
        3D float32 image with the geometry's grid shape and affine.
    """
    data = geometry.scatter(values, fill=fill)
    return nib.Nifti1Image(data.astype(np.float32), np.asarray(geometry.affine, float))


def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    return (tuple(shape_a[:3]) == tuple(shape_b[:3])
            and np.allclose(affine_a, affine_b, atol=1e-4))


def to_source_grid(img, reference, interpolation: str = "linear"):
    """Put a 3D model-grid map on the source BOLD's grid and affine.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        3D map on the model grid.
    reference : nibabel image
        The run's BOLD (3D or 4D; only its header is used) or its reference image.
    interpolation : {"linear", "continuous", "nearest"}
        ``linear`` keeps a non-negative map non-negative (splines overshoot).

    Returns
    -------
    nibabel.Nifti1Image
        Shape ``reference.shape[:3]`` and exactly ``reference.affine``; the data are
        unchanged when the grids already agree.
    """
    ref_shape, ref_affine = tuple(reference.shape[:3]), np.asarray(reference.affine, float)
    if _same_grid(img.shape, img.affine, ref_shape, ref_affine):
        data = np.asarray(img.dataobj, dtype=np.float32)
    else:
        from nilearn.image import resample_img

        out = resample_img(img, target_affine=ref_affine, target_shape=ref_shape,
                           interpolation=interpolation, force_resample=True,
                           copy_header=True)
        data = np.asarray(out.dataobj, dtype=np.float32)
    return nib.Nifti1Image(data, ref_affine)


# -- region summaries ------------------------------------------------------------------
def region_ids(table: pd.DataFrame) -> np.ndarray:
    """Region labels of an atlas table: its ``index`` column, else its index."""
    col = table["index"] if "index" in table.columns else table.index.to_series()
    return np.asarray(col, dtype=np.int64)


def region_table(values: np.ndarray, labels: np.ndarray, table: pd.DataFrame, *,
                 signed_values: Optional[np.ndarray] = None,
                 mask: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Summarise a voxel map per atlas region.

    Parameters
    ----------
    values : ndarray
        Attribution magnitudes, either a 3D map ``(X, Y, Z)`` or tokens ``(N, P)``;
        ``|values|`` is averaged.
    labels : ndarray of int, same shape as ``values``
        Atlas label of each voxel (0 = unlabelled), e.g. ``geometry.labels`` for tokens
        or the atlas resampled onto the map's grid.
    table : DataFrame
        Atlas table with columns ``index``, ``name`` and optionally ``system``.
    signed_values : ndarray, same shape, optional
        Signed map for ``signed_mean`` (default: ``values``).
    mask : ndarray of bool, same shape, optional
        Voxels to count (e.g. ``geometry.voxel_mask``); default every labelled voxel.

    Returns
    -------
    DataFrame
        One row per atlas region (plus any label on the grid that the table lacks) with
        ``index, name, system, mean_abs, signed_mean, n_voxels, rank``; ``rank`` 1 is the
        largest ``mean_abs`` among regions with voxels, NaN for empty regions. The sum of
        ``mean_abs * n_voxels`` equals the sum of ``|values|`` over counted voxels.
    """
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != values.shape:
        raise ValueError(f"labels {labels.shape} and values {values.shape} differ in shape")
    signed = values if signed_values is None else np.asarray(signed_values, np.float64)
    keep = labels > 0
    if mask is not None:
        keep &= np.asarray(mask, bool)
    lab = labels[keep].astype(np.int64)
    ids = region_ids(table)
    extra = np.setdiff1d(np.unique(lab), ids)
    all_ids = np.concatenate([ids, extra])
    size = int(all_ids.max()) + 1 if all_ids.size else 1
    counts = np.bincount(lab, minlength=size).astype(np.int64)
    abs_sums = np.bincount(lab, weights=np.abs(values[keep]), minlength=size)
    signed_sums = np.bincount(lab, weights=signed[keep], minlength=size)
    n = counts[all_ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_abs = np.where(n > 0, abs_sums[all_ids] / np.maximum(n, 1), np.nan)
        signed_mean = np.where(n > 0, signed_sums[all_ids] / np.maximum(n, 1), np.nan)
    meta = table.set_index(pd.Index(ids, name="index"))
    names = [str(meta["name"].get(i, f"label-{i}")) if "name" in meta else f"label-{i}"
             for i in all_ids]
    systems = [str(meta["system"].get(i, "unknown")) if "system" in meta else "unknown"
               for i in all_ids]
    out = pd.DataFrame({"index": all_ids, "name": names, "system": systems,
                        "mean_abs": mean_abs, "signed_mean": signed_mean, "n_voxels": n})
    out["rank"] = out["mean_abs"].rank(ascending=False, method="min").astype("Int64")
    return out


def scaled_region_values(window_abs: np.ndarray, window_rms: np.ndarray, labels: np.ndarray,
                         region_index, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean |attribution| per region divided by the region's own input scale, per window.

    For every window, a region's mean ``|IG|`` over its voxels is divided by the region's
    RMS input (about the IG baseline; for demeaned data and the ``zeros`` baseline, its
    signal SD) in that window, then averaged over windows. Integrated Gradients scale
    with the input (``|IG| ~ |x - b| |grad|``), so this removes what the region's
    amplitude alone contributes and keeps how strongly the model responds to it.

    Parameters
    ----------
    window_abs, window_rms : ndarray, shape (K, N, P)
        From :class:`~bids_roimae.analysis.attribution.IGResult`.
    labels : ndarray of int, shape (N, P)
        Each token voxel's atlas label.
    region_index : sequence of int
        Regions to summarise, in output order.
    mask : ndarray of bool, shape (N, P), optional
        Voxels to count (e.g. ``geometry.voxel_mask``).

    Returns
    -------
    ndarray, shape (R,)
        NaN for a region without voxels or with zero input in every window.
    """
    labels = np.asarray(labels)
    keep = labels > 0 if mask is None else (labels > 0) & np.asarray(mask, bool)
    lab = labels[keep].astype(np.int64)
    ids = np.asarray(region_index, dtype=np.int64)
    size = int(max(lab.max(initial=0), ids.max(initial=0))) + 1
    counts = np.bincount(lab, minlength=size).astype(float)
    per_window = []
    for a, r in zip(np.asarray(window_abs, np.float64), np.asarray(window_rms, np.float64)):
        mean_abs = np.bincount(lab, weights=a[keep], minlength=size)
        mean_sq = np.bincount(lab, weights=r[keep] ** 2, minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            rms = np.sqrt(mean_sq / counts)
            per_window.append(np.where(rms > 0, mean_abs / counts / rms, np.nan))
    if not per_window:
        return np.full(ids.size, np.nan)
    with np.errstate(invalid="ignore"):
        stacked = np.stack(per_window)[:, ids]
        valid = np.isfinite(stacked).any(axis=0)
        out = np.full(ids.size, np.nan)
        out[valid] = np.nanmean(stacked[:, valid], axis=0)
    return out


def region_values(geometry: TokenGeometry, scores: Mapping[int, float]) -> np.ndarray:
    """Per-voxel ``(N, P)`` array painting every labelled voxel with its region's score.

    Voxels of regions without a score (and unlabelled voxels) are 0.
    """
    return paint_regions(geometry.labels, geometry.voxel_mask, scores)


def paint_regions(labels: np.ndarray, mask: np.ndarray, scores: Mapping[int, float]
                  ) -> np.ndarray:
    """float32 array of ``labels``' shape: each voxel inside ``mask`` holds its region's
    score; regions without a finite score, unlabelled voxels and voxels outside are 0."""
    lut_size = int(max([int(labels.max())] + [int(k) for k in scores])) + 1
    lut = np.zeros(lut_size, np.float32)
    for region, score in scores.items():
        if np.isfinite(score):
            lut[int(region)] = score
    return np.where(mask, lut[np.clip(labels, 0, None)], 0.0).astype(np.float32)

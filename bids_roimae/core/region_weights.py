"""Voxel-exact region weights over brain tokens (pure numpy).

A region is its own voxels, not the patches it wins by majority: every token voxel
carries its atlas label (``geometry.labels (N, P)``, brain voxels in
``geometry.voxel_mask (N, P)``), so a region's share of a token is the number of that
token's brain voxels that carry its label. These weights pool anything defined per token
(encoder outputs, token means) into per-region values, and the voxel-level matrix turns a
token window into voxel-exact region means (the region time series of a connectome).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from bids_roimae.errors import BadDataError


@dataclass(frozen=True)
class RegionWeights:
    """How each atlas region is spread over the tokens of a geometry.

    Attributes
    ----------
    region_ids : ndarray, shape (R,)
        Atlas indices of the regions with at least one brain voxel in a token, ascending
        (or in the order requested).
    voxel_counts : ndarray, shape (N, R)
        Brain voxels of region ``r`` in token ``n``.
    """

    region_ids: np.ndarray
    voxel_counts: np.ndarray

    @property
    def n_regions(self) -> int:
        return int(self.region_ids.size)

    @property
    def token_weights(self) -> np.ndarray:
        """``(N, R)`` float32, each column summing to 1: a region's average over tokens
        weighted by how many of its voxels each token holds."""
        counts = self.voxel_counts.astype(np.float64)
        return (counts / counts.sum(axis=0, keepdims=True)).astype(np.float32)

    @property
    def region_voxels(self) -> np.ndarray:
        """``(R,)`` brain voxels of each region."""
        return self.voxel_counts.sum(axis=0)


def present_regions(labels: np.ndarray, voxel_mask: np.ndarray) -> np.ndarray:
    """Atlas indices (> 0) that label at least one brain voxel of a token, ascending."""
    labels = np.asarray(labels)
    return np.unique(labels[np.asarray(voxel_mask, bool) & (labels > 0)]).astype(np.int64)


def region_weights(labels: np.ndarray, voxel_mask: np.ndarray,
                   region_ids: Optional[Sequence[int]] = None) -> RegionWeights:
    """Voxel counts of every region in every token.

    Parameters
    ----------
    labels : int array, shape (N, P)
        Atlas label of each token voxel (0 = unlabelled).
    voxel_mask : bool array, shape (N, P)
        Brain voxels of each token.
    region_ids : sequence of int, optional
        Regions to keep, in this order (default: every region present).

    Returns
    -------
    RegionWeights

    Raises
    ------
    BadDataError
        A requested region has no brain voxel in any token (it cannot be pooled); the
        message names them (exit code 65).
    """
    labels = np.asarray(labels)
    mask = np.asarray(voxel_mask, bool)
    if labels.shape != mask.shape:
        raise ValueError(f"labels {labels.shape} and voxel_mask {mask.shape} differ")
    present = present_regions(labels, mask)
    ids = present if region_ids is None else np.asarray(list(region_ids), np.int64)
    missing = sorted(set(ids.tolist()) - set(present.tolist()))
    if missing:
        raise BadDataError(f"atlas regions {missing[:10]} have no brain voxel in any token "
                           "of this geometry: they cannot be read out")
    column = np.full(int(max(labels.max(initial=0), ids.max(initial=0))) + 1, -1, np.int64)
    column[ids] = np.arange(ids.size)
    n = labels.shape[0]
    token = np.broadcast_to(np.arange(n)[:, None], labels.shape)
    keep = mask & (labels > 0)
    col = column[np.where(keep, labels, 0)]
    keep &= col >= 0
    counts = np.zeros((n, ids.size), np.int64)
    np.add.at(counts, (token[keep], col[keep]), 1)
    return RegionWeights(ids, counts)


def voxel_region_matrix(labels: np.ndarray, voxel_mask: np.ndarray,
                        region_ids: np.ndarray) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """Sparse ``(N * P, R)`` matrix whose product with a flattened window ``(T, N * P)``
    gives voxel-exact region means ``(T, R)`` (each column sums to 1 over the region's own
    brain voxels)."""
    from scipy import sparse

    labels = np.asarray(labels).ravel()
    keep = np.asarray(voxel_mask, bool).ravel() & (labels > 0)
    column = np.full(int(max(labels.max(initial=0), np.max(region_ids, initial=0))) + 1, -1,
                     np.int64)
    column[np.asarray(region_ids)] = np.arange(len(region_ids))
    rows = np.flatnonzero(keep)
    cols = column[labels[rows]]
    rows, cols = rows[cols >= 0], cols[cols >= 0]
    sizes = np.bincount(cols, minlength=len(region_ids)).astype(np.float64)
    values = (1.0 / sizes[cols]).astype(np.float32)
    return sparse.csr_matrix((values, (rows, cols)), shape=(labels.size, len(region_ids)))

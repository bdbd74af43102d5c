"""Frozen-encoder features of one participant, every readout at once.

What ``participant --mode embed`` writes, so the pretrained model can serve as a feature
extractor in a user's own statistics: the mean readout ``(D,)``, the region readout
``(R, D)`` (encoder tokens pooled per atlas region with voxel weights, averaged over time
and windows), the region correlation ``(R, R)`` (across-time correlation of the
region-pooled tokens within each window, averaged over windows) and the region SD
``(R, D)`` (across-time SD of the region-pooled tokens before the final norm within each
window, averaged over windows). These are the same quantities the fine-tuning readouts
(:mod:`bids_roimae.model.readout`) feed a classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from bids_roimae.core.region_weights import region_weights
from bids_roimae.model.readout import (
    ReadoutEncoder,
    pool_regions,
    region_correlation,
    region_sd,
)
from bids_roimae.training.windows import autocast, batches, load_windows


@dataclass(frozen=True)
class EncoderFeatures:
    """One participant's frozen-encoder features.

    Attributes
    ----------
    mean : ndarray, shape (D,)
    region : ndarray, shape (R, D)
    region_correlation : ndarray, shape (R, R)
        Symmetric, 1 on the diagonal.
    region_sd : ndarray, shape (R, D), or None
        None when a window has a single time token (nothing varies within it).
    region_ids : ndarray, shape (R,)
        Atlas indices of the rows of ``region`` (every region with a brain voxel).
    n_windows : int
    """

    mean: np.ndarray
    region: np.ndarray
    region_correlation: np.ndarray
    region_sd: Optional[np.ndarray]
    region_ids: np.ndarray
    n_windows: int


@torch.no_grad()
def encoder_features(mae: nn.Module, refs: Sequence, geometry, window: int, batch_size: int,
                     device) -> EncoderFeatures:
    """Every readout of a participant's windows.

    Parameters
    ----------
    mae : nn.Module
        Pretrained autoencoder (``encode(x) -> (B, T', N, D)``).
    refs : sequence of (entry, start)
        The participant's windows (at least one).
    geometry : TokenGeometry
        ``labels`` and ``voxel_mask`` give the region weights.
    window, batch_size : int
    device : str or torch.device
    """
    if not refs:
        raise ValueError("no window to embed")
    weights = region_weights(geometry.labels, geometry.voxel_mask)
    reader = ReadoutEncoder(mae, "region", weights.token_weights).to(device).eval()
    with_sd = int(getattr(mae, "n_time", 2)) >= 2
    mean, region, corr, sd = [], [], [], []
    for chunk in batches(list(refs), max(1, batch_size)):
        x = torch.from_numpy(load_windows(chunk, window)).to(device)
        with autocast(device):
            # One encoder pass: with every token visible, encode(x) is the final norm of
            # the residual stream, which region-sd reads before it.
            residual = mae.encode(x, normed=False)  # (B, T', N, D)
            tokens = mae.norm(residual).float()
        residual = residual.float()
        pooled = pool_regions(tokens, reader.token_weights)
        mean.append(tokens.mean(dim=(1, 2)).cpu().numpy())
        region.append(pooled.mean(dim=1).cpu().numpy())
        corr.append(region_correlation(pooled).cpu().numpy())
        if with_sd:
            sd.append(region_sd(pool_regions(residual, reader.token_weights)).cpu().numpy())
    r = weights.n_regions
    upper = np.concatenate(corr).mean(axis=0)
    matrix = np.eye(r)
    i, j = np.triu_indices(r, k=1)
    matrix[i, j] = upper
    matrix[j, i] = upper
    return EncoderFeatures(np.concatenate(mean).mean(axis=0),
                           np.concatenate(region).mean(axis=0), matrix,
                           np.concatenate(sd).mean(axis=0) if with_sd else None,
                           weights.region_ids, len(refs))

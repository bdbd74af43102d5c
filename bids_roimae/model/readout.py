"""How a window's encoder tokens become one feature vector (torch; no I/O).

``mean``
    the encoder output averaged over every token (``RoiMAE.embed``), ``(B, D)``.
``region``
    encoder tokens pooled per atlas region with each region's voxel weights (a token that
    holds 40 of a region's voxels counts 40 times one that holds 1), then averaged over
    time: ``(B, R * D)``. What the encoder learned about one region is no longer averaged
    with every other region before a classifier sees it.
``region-cov``
    ``region`` plus the across-time correlation of the region-pooled tokens (each pair of
    regions: the correlation over time steps of their pooled tokens, all ``D`` feature
    dimensions pooled), ``(B, R * D + R * (R - 1) / 2)``: the encoder's counterpart of a
    functional connectome.
``region-sd``
    the across-time standard deviation of the region-pooled tokens of the residual stream
    before the encoder's final norm, ``(B, R * D)``: how much each region's encoding moves
    within the window. The final norm rescales every token to unit variance, so a region
    that fluctuates twice as much looks the same after it; before it, its tokens keep that
    scale. The example's planted group difference, like many reported in resting-state
    fMRI, is in such second-order statistics (fluctuation amplitude, coupling), which a
    time average cannot carry.
    Needs at least two time tokens per window.

:class:`ReadoutEncoder` wraps a pretrained autoencoder so that its ``embed`` gives the
readout's features; the fine-tuned :class:`~bids_roimae.model.classifier.Classifier`,
window embedding and attribution use it unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bids_roimae.core.region_weights import region_weights

READOUTS = ("mean", "region", "region-cov", "region-sd")


def pool_regions(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Region-pooled tokens.

    Parameters
    ----------
    tokens : tensor, shape (B, T', N, D)
        Encoder output of every token.
    weights : tensor, shape (N, R)
        Each column sums to 1 (:attr:`bids_roimae.core.region_weights.RegionWeights.token_weights`).

    Returns
    -------
    tensor, shape (B, T', R, D)
    """
    return torch.einsum("btnd,nr->btrd", tokens, weights.to(tokens.dtype))


def region_correlation(pooled: torch.Tensor) -> torch.Tensor:
    """Upper triangle of the across-time correlation of region-pooled tokens.

    Parameters
    ----------
    pooled : tensor, shape (B, T', R, D)

    Returns
    -------
    tensor, shape (B, R * (R - 1) / 2)
        ``corr(r, s) = sum_{t,d} a_rtd a_std / sqrt(sum a_rtd^2 sum a_std^2)`` with ``a``
        the tokens centred over time; 0 for a region whose pooled tokens do not vary.
    """
    centred = pooled - pooled.mean(dim=1, keepdim=True)
    b, t, r, d = centred.shape
    flat = centred.permute(0, 2, 1, 3).reshape(b, r, t * d)
    norm = flat.norm(dim=2, keepdim=True).clamp_min(1e-6)
    unit = flat / norm
    corr = unit @ unit.transpose(1, 2)
    i, j = torch.triu_indices(r, r, offset=1, device=corr.device)
    return corr[:, i, j]


def region_sd(pooled: torch.Tensor) -> torch.Tensor:
    """Across-time standard deviation of region-pooled tokens.

    Parameters
    ----------
    pooled : tensor, shape (B, T', R, D)

    Returns
    -------
    tensor, shape (B, R, D)
        Population SD over the ``T'`` time steps. A tiny variance floor keeps the gradient
        finite where a region does not vary (Integrated Gradients differentiates through
        it, from a baseline that may be constant).
    """
    return (pooled.var(dim=1, correction=0) + 1e-12).sqrt()


def readout_dim(readout: str, embed_dim: int, n_regions: int) -> int:
    """Length of a window's feature vector for a readout."""
    if readout == "mean":
        return embed_dim
    region = n_regions * embed_dim
    if readout in ("region", "region-sd"):
        return region
    if readout == "region-cov":
        return region + n_regions * (n_regions - 1) // 2
    raise ValueError(f"unknown readout {readout!r}; expected {', '.join(READOUTS)}")


class ReadoutEncoder(nn.Module):
    """A pretrained autoencoder whose ``embed`` returns a readout's features.

    Parameters
    ----------
    mae : nn.Module
        With ``encode(x (B, W, N, P)) -> (B, T', N, D)`` and ``embed(x) -> (B, D)``.
    readout : {"mean", "region", "region-cov", "region-sd"}
    token_weights : array, shape (N, R)
        Voxel weights of each region over tokens (columns sum to 1); unused for ``mean``.

    ``embed(x)`` maps ``(B, W, N, P)`` to ``(B, readout_dim)``; ``encode`` is the wrapped
    model's. The weights follow from the geometry stored in every checkpoint, so they are
    a non-persistent buffer: a saved classifier's weights are the autoencoder's and its
    head's only.
    """

    def __init__(self, mae: nn.Module, readout: str, token_weights=None):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; expected {', '.join(READOUTS)}")
        if readout != "mean" and token_weights is None:
            raise ValueError(f"readout {readout!r} needs region weights")
        if readout == "region-sd" and int(getattr(mae, "n_time", 2)) < 2:
            raise ValueError("readout 'region-sd' needs at least 2 time tokens per window; "
                             f"this model's windows have {int(mae.n_time)} (window / "
                             "temporal_patch): choose another readout")
        self.mae = mae
        self.readout = readout
        weights = np.zeros((0, 0), np.float32) if token_weights is None else token_weights
        self.register_buffer("token_weights", torch.as_tensor(np.asarray(weights, np.float32)),
                             persistent=False)

    @property
    def n_regions(self) -> int:
        return int(self.token_weights.shape[1]) if self.token_weights.ndim == 2 else 0

    @property
    def embed_dim(self) -> int:
        return readout_dim(self.readout, int(self.mae.embed_dim), self.n_regions)

    def encode(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """The wrapped model's encoder output ``(B, T', N, D)``."""
        return self.mae.encode(x, mask)

    def region_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Region-pooled encoder tokens ``(B, T', R, D)`` (all tokens visible)."""
        return pool_regions(self.mae.encode(x), self.token_weights)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of windows ``x (B, W, N, P)`` -> ``(B, readout_dim)``."""
        if self.readout == "mean":
            return self.mae.embed(x)
        if self.readout == "region-sd":
            residual = pool_regions(self.mae.encode(x, normed=False), self.token_weights)
            return region_sd(residual).flatten(1)
        pooled = self.region_tokens(x)
        region = pooled.mean(dim=1).flatten(1)
        if self.readout == "region":
            return region
        return torch.cat([region, region_correlation(pooled.float()).to(region.dtype)], dim=1)


def build_readout(mae: nn.Module, readout: str, geometry) -> nn.Module:
    """The encoder a classifier uses for ``readout``: ``mae`` itself for ``mean`` (so
    checkpoints keep their layout), else a :class:`ReadoutEncoder` over every region with
    a brain voxel in the geometry (``geometry.labels``, ``geometry.voxel_mask``)."""
    if readout == "mean":
        return mae
    weights = region_weights(geometry.labels, geometry.voxel_mask)
    return ReadoutEncoder(mae, readout, weights.token_weights)

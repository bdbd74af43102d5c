"""Reconstruction skill against trivial predictors, so a user sees whether pretraining
learned anything.

On the same hidden brain voxels as the loss, the model's squared error is compared with
two predictors that need no training:

``zero``
    predict 0 (the mean of a scaled signal, or of a per-token normalised target):
    ``skill_zero = 1 - MSE / MSE(0)``.
``visible``
    predict each hidden token as the mean of the **visible** tokens of the same atlas
    region at the same time step, or of all visible tokens at that time step where the
    whole region is hidden (ROI masking hides whole regions):
    ``skill_visible = 1 - MSE / MSE(visible mean)``.

Skill 0 means no better than the trivial predictor, 1 a perfect reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bids_roimae.model.mae import HiddenTokens


@dataclass
class SkillSums:
    """Squared-error sums over hidden brain voxels, accumulated over batches."""

    model: float = 0.0
    zero: float = 0.0
    visible: float = 0.0

    def add(self, other: "SkillSums") -> None:
        self.model += other.model
        self.zero += other.zero
        self.visible += other.visible

    @property
    def skill_zero(self) -> float:
        return 1.0 - self.model / self.zero if self.zero > 0 else float("nan")

    @property
    def skill_visible(self) -> float:
        return 1.0 - self.model / self.visible if self.visible > 0 else float("nan")


def token_regions(patch_label: np.ndarray) -> torch.Tensor:
    """``(N,)`` compact region index of each token (its majority atlas label), 0.. G-1."""
    _, inverse = np.unique(np.asarray(patch_label), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def visible_region_means(target: torch.Tensor, hidden: torch.Tensor,
                         feature_mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """The ``visible`` predictor per region: ``(B, T', G, F)``.

    Each region's mean over its visible tokens at each time step, or the mean of all
    visible tokens at that time step where the region is hidden entirely.

    Parameters
    ----------
    target : tensor, shape (B, T', N, F)
    hidden : bool tensor, shape (B, T', N)
    feature_mask : bool tensor, shape (N, F)
        Brain voxels of each token's features.
    regions : long tensor, shape (N,)
        Region of each token (``token_regions``).
    """
    b, t, n, f = target.shape
    g = int(regions.max()) + 1
    weight = (~hidden)[..., None].to(target.dtype) * feature_mask.to(target.dtype)
    sums = target.new_zeros(b, t, g, f).index_add_(2, regions, target * weight)
    counts = target.new_zeros(b, t, g, f).index_add_(2, regions, weight)
    overall = (target * weight).sum(2, keepdim=True) / weight.sum(2, keepdim=True).clamp_min(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), overall)


def visible_mean_prediction(target: torch.Tensor, hidden: torch.Tensor,
                            feature_mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """The ``visible`` predictor at every token: ``(B, T', N, F)`` (see
    :func:`visible_region_means`)."""
    return visible_region_means(target, hidden, feature_mask, regions)[:, :, regions]


@torch.no_grad()
def skill_sums(hidden_tokens: HiddenTokens, mask: torch.Tensor, feature_mask: torch.Tensor,
               regions: torch.Tensor) -> SkillSums:
    """Squared errors of the model and both trivial predictors on one batch, at the
    hidden tokens' brain voxels.

    Parameters
    ----------
    hidden_tokens : HiddenTokens
        :meth:`~bids_roimae.model.mae.RoiMAE.hidden_tokens` of the batch (divided:
        ``pred (B, T', Q, F)`` at token ``rows``; joint: ``(B, Q, F)`` at flat rows).
    mask : bool tensor, shape (B, T', N); True = hidden
    feature_mask : bool tensor, shape (N, F)
        Every token's brain voxels (the model's ``feature_mask``).
    regions : long tensor, shape (N,)
    """
    h = hidden_tokens
    targets = h.targets.float()
    hidden = mask.to(targets.device, torch.bool)
    regions = regions.to(targets.device)
    n_tokens = targets.shape[2]
    region_means = visible_region_means(targets, hidden, feature_mask.to(targets.device),
                                        regions)
    b, t, _, f = region_means.shape
    if h.pred.ndim == 4:  # divided: rows are tokens, every time step
        at_rows = regions[h.rows]  # (B, Q)
        baseline = torch.gather(region_means, 2,
                                at_rows[:, None, :, None].expand(b, t, at_rows.shape[1], f))
    else:  # joint: rows index the flattened T' * N tokens
        at_time, at_token = h.rows // n_tokens, h.rows % n_tokens
        batch = torch.arange(b, device=targets.device)[:, None]
        baseline = region_means[batch, at_time, regions[at_token]]
    voxels = h.voxel_weight()
    target = h.target.float()
    return SkillSums(model=float((((h.pred.float() - target) ** 2) * voxels).sum()),
                     zero=float(((target ** 2) * voxels).sum()),
                     visible=float((((baseline - target) ** 2) * voxels).sum()))


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
from torch import nn


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


def visible_mean_prediction(target: torch.Tensor, hidden: torch.Tensor,
                            feature_mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """The ``visible`` predictor.

    Parameters
    ----------
    target : tensor, shape (B, T', N, F)
    hidden : bool tensor, shape (B, T', N)
    feature_mask : bool tensor, shape (N, F)
        Brain voxels of each token's features.
    regions : long tensor, shape (N,)
        Region of each token (``token_regions``).

    Returns
    -------
    tensor, shape (B, T', N, F)
    """
    b, t, n, f = target.shape
    g = int(regions.max()) + 1
    weight = (~hidden)[..., None].to(target.dtype) * feature_mask.to(target.dtype)
    sums = target.new_zeros(b, t, g, f).index_add_(2, regions, target * weight)
    counts = target.new_zeros(b, t, g, f).index_add_(2, regions, weight)
    overall = (target * weight).sum(2, keepdim=True) / weight.sum(2, keepdim=True).clamp_min(1)
    region_mean = torch.where(counts > 0, sums / counts.clamp_min(1), overall)
    return region_mean[:, :, regions]


@torch.no_grad()
def skill_sums(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor,
               regions: torch.Tensor) -> SkillSums:
    """Squared errors of the model and both trivial predictors on one batch.

    Parameters
    ----------
    model : RoiMAE
        ``group_time``, ``targets``, ``feature_mask``.
    x : tensor, shape (B, W, N, P)
    mask : bool tensor, shape (B, T', N); True = hidden
    pred : tensor, shape (B, T', N, F)
        The model's reconstruction, ``model(x, mask)[1]`` (the validation pass's own, so
        scoring costs no second forward pass).
    regions : long tensor, shape (N,)
    """
    target = model.targets(model.group_time(x)).float()
    hidden = mask.to(target.device, torch.bool)
    fm = model.feature_mask
    weight = (hidden[..., None] & fm).float()
    baseline = visible_mean_prediction(target, hidden, fm, regions.to(target.device))
    return SkillSums(model=float((((pred.float() - target) ** 2) * weight).sum()),
                     zero=float(((target ** 2) * weight).sum()),
                     visible=float((((baseline - target) ** 2) * weight).sum()))

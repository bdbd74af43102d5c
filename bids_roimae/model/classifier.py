"""The fine-tuned classifier: encoder + feature standardisation + head (torch; no I/O).

Every fine-tuning strategy (:mod:`bids_roimae.training.classifier_fit`) ends as a
:class:`Classifier` whose ``forward`` maps windows to logits, so attribution
differentiates through the same model that made the prediction. A subject's prediction
averages its window logits (:func:`subject_output`).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch
from torch import nn


def build_head(kind: str, embed_dim: int, n_outputs: int) -> nn.Module:
    """``linear``: one linear layer; ``mlp``: Linear-GELU-Dropout-Linear (hidden D/2)."""
    if kind == "linear":
        return nn.Linear(embed_dim, n_outputs)
    if kind == "mlp":
        hidden = max(16, embed_dim // 2)
        return nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(0.1),
                             nn.Linear(hidden, n_outputs))
    raise ValueError(f"unknown head {kind!r}; expected linear or mlp")


class Classifier(nn.Module):
    """Encoder + feature standardisation + head, windows in, logits out.

    Parameters
    ----------
    encoder : nn.Module
        A pretrained model with ``embed(x (B, W, N, P)) -> (B, D)``.
    head : nn.Module
        Maps standardised embeddings (B, D) to (B, C).
    feature_mean, feature_scale : tensor, shape (D,)
        Standardisation of embeddings (identity when omitted).
    target_mean, target_scale : float
        Regression: the head predicts ``(y - mean) / scale``; ``forward`` undoes it.
    label_info : dict
        ``target``, ``task_type``, ``classes``, ``positive``, ``negative`` (see
        :func:`bids_roimae.analysis.labels.parse_labels`), used to decode outputs.

    ``forward`` returns (B, C): one logit for binary, C logits for multi-class, the
    predicted value for regression.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, embed_dim: int,
                 feature_mean=None, feature_scale=None, target_mean: float = 0.0,
                 target_scale: float = 1.0, label_info: Optional[dict] = None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        mean = torch.zeros(embed_dim) if feature_mean is None else torch.as_tensor(feature_mean)
        scale = torch.ones(embed_dim) if feature_scale is None else torch.as_tensor(feature_scale)
        self.register_buffer("feature_mean", mean.float().clone())
        self.register_buffer("feature_scale", scale.float().clone())
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_scale", torch.tensor(float(target_scale)))
        self.label_info = dict(label_info or {})

    @property
    def task_type(self) -> str:
        return self.label_info.get("task_type", "binary")

    def head_forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Head on raw encoder embeddings (B, D) -> (B, C)."""
        out = self.head((embedding.float() - self.feature_mean) / self.feature_scale)
        if self.task_type == "regression":
            out = out * self.target_scale + self.target_mean
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``x`` (B, W, N, P) -> logits (B, C)."""
        return self.head_forward(self.encoder.embed(x))

    def with_random_head(self, seed: int) -> "Classifier":
        """The same encoder and standardisation with a freshly initialised head.

        The model-randomisation check of Adebayo et al. (2018): attributions that this
        model also produces come from the input and the architecture, not from what the
        classifier learned. The encoder is shared (not copied); ``seed`` makes the random
        head reproducible, so every participant is attributed by the same random model.
        """
        head = copy.deepcopy(self.head)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(seed))
        try:
            for module in head.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        finally:
            torch.random.set_rng_state(gen_state)
        out = Classifier(self.encoder, head, int(self.feature_mean.numel()),
                         self.feature_mean, self.feature_scale, float(self.target_mean),
                         float(self.target_scale), self.label_info)
        return out.to(self.feature_mean.device).eval()


def subject_output(window_logits: np.ndarray, task_type: str) -> np.ndarray:
    """Combine a subject's window logits (K, C) into its prediction.

    Returns P(positive) as shape () for binary, class probabilities (C,) for multi-class,
    the predicted value () for regression; the logits are averaged first.
    """
    mean = np.asarray(window_logits, np.float64).mean(axis=0)
    if task_type == "binary":
        return np.asarray(1.0 / (1.0 + math.exp(-float(mean[0]))))
    if task_type == "multiclass":
        e = np.exp(mean - mean.max())
        return e / e.sum()
    return np.asarray(float(mean[0]))


def n_outputs(task_type: str, n_classes: int) -> int:
    """Head outputs: one per class for multi-class, one logit or value otherwise."""
    return n_classes if task_type == "multiclass" else 1

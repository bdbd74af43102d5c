"""The optimisation schedule of pretraining: how many steps, the learning rate of each
(linear warmup, then cosine decay to ``min_lr``), and which parameters get weight decay.
"""

from __future__ import annotations

import math

import torch

from bids_roimae.config import AppConfig

#: Peak learning rate of each model preset unless ``train.lr`` is set. Measured for tiny
#: (README, "Does the foundation model beat a connectome?"): after 40 steps of batch 4 the
#: validation skill against predicting zero was 0.004 at 1.5e-4, 0.059 at 1e-3 and 0.073 at
#: 3e-3. 1e-3, not 3e-3: it is what every science run used, and has room for long runs.
#: small and base keep the usual 1.5e-4 of ViT-sized masked autoencoders.
PRESET_PEAK_LR = {"tiny": 1e-3, "small": 1.5e-4, "base": 1.5e-4}


def peak_lr(cfg: AppConfig) -> float:
    """``train.lr``, or the model preset's peak learning rate when it is unset."""
    return float(cfg.train.lr) if cfg.train.lr is not None else PRESET_PEAK_LR[cfg.model.preset]


def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, cosine to min_lr."""
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def total_steps(cfg: AppConfig, n_epoch_windows: int, world: int) -> int:
    """Steps to run: ``train.steps``, or ``train.epochs`` passes over the windows."""
    if cfg.train.epochs:
        per_step = cfg.train.batch_size * world
        return max(1, math.ceil(cfg.train.epochs * n_epoch_windows / per_step))
    return int(cfg.train.steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, the mask token and other 1-D parameters."""
    decay, plain = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]

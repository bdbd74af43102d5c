"""Running a trained module for analysis: evaluation mode, no parameter gradients."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (only input gradients are needed), restored."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def device_of(module: nn.Module) -> torch.device:
    """The device of the first parameter (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")

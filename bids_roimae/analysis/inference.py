"""Running a trained module for analysis: evaluation mode, no parameter gradients, and
how much work one pass may take on the device."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from bids_roimae.host import available_memory


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


#: The most a CPU pass may use: other work (cache reads, other processes) shares the RAM.
CPU_BUDGET_BYTES = 2 << 30


def memory_budget(device: torch.device) -> int:
    """Bytes one analysis pass may use: half the free GPU memory on CUDA; on CPU a quarter
    of the available memory, at most :data:`CPU_BUDGET_BYTES`."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    return min(CPU_BUDGET_BYTES, available_memory() // 4)


def items_per_pass(bytes_per_item: int, device, budget_bytes: Optional[int] = None,
                   most: int = 64) -> int:
    """How many items of ``bytes_per_item`` fit the budget: between 1 and ``most``."""
    budget = memory_budget(device) if budget_bytes is None else int(budget_bytes)
    return int(min(most, max(1, budget // max(int(bytes_per_item), 1))))

"""DDP set-up from the environment ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK).

A plain ``python`` start is a world of one and needs no process group. Backend: NCCL on
CUDA, gloo on CPU. Only rank 0 writes files; ranks meet at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world``, its device, and who set it up."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place maximum over ranks (a no-op alone)."""
        if self.active:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor

    def close(self) -> None:
        if self.owns_group and self.active:
            torch_dist.barrier()
            torch_dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device="cpu") -> DistContext:
    """Join the process group that ``torchrun`` describes, if any.

    Parameters
    ----------
    device : str or torch.device
        Requested device kind; on CUDA each rank takes ``cuda:LOCAL_RANK``.

    Returns
    -------
    DistContext
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world <= 1:
        return DistContext(0, 1, device)
    owns = False
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend)
        owns = True
    return DistContext(torch_dist.get_rank(), torch_dist.get_world_size(), device, owns)

"""DDP set-up from the environment ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK).

A plain ``python`` start is a world of one and needs no process group. Backend: NCCL on
CUDA, gloo on CPU. Only rank 0 writes files; ranks meet at barriers.

Work that takes long and unevenly across ranks (preparing BOLD runs before pretraining)
meets in :meth:`DistContext.gather_objects`, over a separate gloo group whose timeout is
:data:`SLOW_WAIT`: NCCL's default collective timeout (10 minutes) would kill ranks that
finish their share of the preparation early.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as torch_dist

#: How long ranks wait for each other in :meth:`DistContext.gather_objects`.
SLOW_WAIT = datetime.timedelta(hours=24)


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world``, its device, and who set it up."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False
    _slow_group: Optional[Any] = field(default=None, repr=False)

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

    def shard(self, items: Sequence) -> list:
        """This rank's share of ``items``: every ``world``-th item from ``rank`` on.

        Striding (not blocks) spreads subjects sorted by size over all ranks.
        """
        return list(items[self.rank::self.world])

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` alone.

        A collective: each rank waits (up to :data:`SLOW_WAIT`) until all have called
        it, so it doubles as a barrier after uneven work. It runs over a gloo group made
        on first use, the same call on every rank.
        """
        if not self.active:
            return [obj]
        if self._slow_group is None:
            self._slow_group = torch_dist.new_group(backend="gloo", timeout=SLOW_WAIT)
        gathered: list = [None] * self.world
        torch_dist.all_gather_object(gathered, obj, group=self._slow_group)
        return gathered

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

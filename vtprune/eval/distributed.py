"""Data-parallel `vtprune eval` under ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address); when
``WORLD_SIZE > 1`` the eval joins a process group (``nccl`` on CUDA, ``gloo`` on the CPU), each rank
runs the batches ``rank, rank + W, rank + 2W, ...`` of the single-process batch order (so every batch,
with its padding, is exactly what one process would have run, and predictions match it), and rank 0
gathers every rank's records and timings, then writes the results alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Shard:
    """This process's place in the launch: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batches(self, batches: list) -> list:
        """This rank's share of the batch list: every ``world``-th batch, starting at ``rank``."""
        return batches[self.rank::self.world]


def launched_shard() -> Shard:
    """The `Shard` the launcher's environment describes (a single process when none is set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    return Shard(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(shard: Shard, device) -> None:
    """Join the launch's process group (no-op for a single process)."""
    import torch.distributed as dist

    if shard.world <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def gather_to_main(shard: Shard, payload: Any) -> list[Any] | None:
    """Every rank's ``payload`` (picklable) on rank 0, in rank order; None on the other ranks."""
    if shard.world <= 1:
        return [payload]
    import torch.distributed as dist

    received: list[Any] | None = [None] * shard.world if shard.main else None
    dist.gather_object(payload, received, dst=0)
    return received


def finish(shard: Shard) -> None:
    """Wait for every rank, then leave the process group."""
    if shard.world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

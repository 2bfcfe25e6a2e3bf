"""Distributed training under torchrun: who this process is, its device, and gathering results.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them a run is one process and
everything here is a no-op. GPUs talk over nccl, CPUs over gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medseg.device import resolve_device
from medseg.errors import ConfigError, InputError, MedsegError

__all__ = ["Distributed", "setup_distributed"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run (rank 0 of 1 when alone).

    Args:
        rank: global rank; rank 0 writes checkpoints and logs.
        world: number of processes.
        local_rank: rank on this node (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work):
        """``work()`` run on rank 0 alone, its result on every rank; a ``MedsegError`` it raises
        is raised on every rank, so none waits for a rank that has stopped."""
        if not self.enabled:
            return work()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except MedsegError as exc:  # sent as its parts: MedsegError does not pickle
                outcome = ("error", (type(exc).__name__, exc.where, exc.message))
        kind, value = self.from_main(outcome)
        if kind == "error":
            name, where, message = value
            raise {"InputError": InputError, "ConfigError": ConfigError}.get(name, MedsegError)(
                where, message
            )
        return value

    def barrier(self) -> None:
        """Wait here until every rank arrives."""
        if self.enabled:
            dist.barrier()

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks (so all ranks agree to stop together)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())


def setup_distributed(device: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device.

    Under torchrun with GPUs, each process takes ``cuda:LOCAL_RANK`` and nccl; on CPUs, gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank), chosen

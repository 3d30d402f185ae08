"""torch.distributed helpers: the training stage runs the same code alone or under ``torchrun``.

``torchrun`` describes the job in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...);
without those variables everything here is a no-op for a single process, so callers never branch on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0


def dist_env() -> DistInfo:
    """The job layout from torchrun's environment variables (a single process when they are absent)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: torch.device) -> tuple[DistInfo, bool]:
    """Join the process group when launched by torchrun: NCCL on CUDA, gloo on the CPU.

    Returns the layout and whether this call created the group (so only its creator destroys it).
    """
    info = dist_env()
    if not info.enabled or dist.is_initialized():
        return info, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info, True


def destroy_distributed(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity for a single process); metrics are sums so this is exact."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank.

    DDP keeps parameters in sync, but each rank's last forward updates its own batch-norm statistics,
    so buffers (and an EMA of them) drift apart; syncing at epoch end makes every rank validate and
    checkpoint the same model.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank ``src``'s integer on every rank (a decision all ranks must share: early stopping, the planned epochs)."""
    if not is_distributed():
        return value
    t = torch.tensor([int(value)], device=device)
    dist.broadcast(t, src)
    return int(t.item())


def broadcast_flag(value: bool, device: torch.device, src: int = 0) -> bool:
    """Rank ``src``'s boolean on every rank (e.g. the early-stopping decision)."""
    return bool(broadcast_int(int(value), device, src))

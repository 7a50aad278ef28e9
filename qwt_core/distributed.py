"""Small helpers around ``torch.distributed`` (torchrun / torch.distributed.launch)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_dist() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed_from_env(device: str = "cuda", local_rank: int | None = None) -> tuple[int, int, int]:
    """Initialise the process group when launched by torchrun / ``torch.distributed.launch``.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (or the ``--local_rank`` argument of the legacy
    launcher). Uses NCCL on CUDA, gloo otherwise. Returns ``(rank, world_size, local_rank)``;
    ``(0, 1, 0)`` when not launched distributed.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1, 0
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, local


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op when not distributed); returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place element-wise maximum across ranks (no-op when not distributed); returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Missing gradients become zeros (as DDP does for unused parameters), then every gradient is
    averaged over ranks in one flat all-reduce (no-op alone, besides the zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not is_dist() or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes indices ``r, r+w, r+2w, …`` of ``range(n)`` — no padding, so no sample
    is counted twice when per-rank counts are all-reduced.

    (``DistributedSampler`` pads the last round with repeated samples so all ranks have the same length;
    that is harmless for training but would double count in a top-1 sum.)
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def rank_slice(n: int, rank: int = 0, world_size: int = 1) -> slice:
    """The contiguous part ``[n·r // w, n·(r+1) // w)`` of ``range(n)`` owned by rank ``r`` of ``w``:
    the parts cover ``range(n)`` exactly once (sizes differ by at most one)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def destroy_distributed() -> None:
    """Destroy the process group if one is initialised (no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

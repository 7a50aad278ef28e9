"""Process-group setup for torchrun and the legacy ``torch.distributed.launch`` (``--local_rank``)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from qwt_core.distributed import init_distributed_from_env


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` if available, else ``cpu``; an unavailable ``cuda`` is a one-line error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {requested} requested but CUDA is not available")
    return requested


def setup(device: str, local_rank: Optional[int] = None) -> tuple[int, int, torch.device]:
    """Initialise distributed mode when launched with several processes.

    ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``torch.distributed.launch`` sets them
    too with ``--use_env``, otherwise passes ``--local_rank N`` (or ``--local-rank N``), given here
    as ``local_rank``. Returns ``(rank, world_size, device)``: ``cuda:LOCAL_RANK`` on GPUs (NCCL),
    the requested CPU device otherwise (gloo).
    """
    device = resolve_device(device)
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    rank, world, local = init_distributed_from_env(device, local_rank)
    if device.startswith("cuda"):
        dev = torch.device("cuda", local if world > 1 else (torch.device(device).index or 0))
    else:
        dev = torch.device(device)
    return rank, world, dev


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Process setup shared by the detection tools (``tools/test.py``, ``tools/zsqat.py``,
``tools/synthesize.py``): device, optional ``torchrun`` process group, mmdet registries."""
from __future__ import annotations

from typing import Optional


def setup_process(device: Optional[str], launcher: str, local_rank: int) -> tuple[str, int, int]:
    """Pick the device, join the process group when launched by ``torchrun`` and register mmdet.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (cuda when available).
        launcher: ``"none"`` (one process) or ``"pytorch"`` (``torchrun`` environment).
        local_rank: the ``--local_rank`` argument of the legacy launcher.
    Returns:
        ``(device, rank, world_size)``; under ``torchrun`` on GPUs the device is this rank's GPU.
    """
    import torch
    from mmdet.utils import register_all_modules
    from mmengine.registry import init_default_scope

    from qwt_core.distributed import get_rank, get_world_size, init_distributed_from_env

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if launcher != "none":
        init_distributed_from_env(device, local_rank)
    if device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet")
    return device, get_rank(), get_world_size()

"""What every benchmark shares: where results go and the machine they were measured on."""
from __future__ import annotations

import os
import platform
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where benchmarks write their JSON/CSV (tracked in git: the docs' tables are read from these files).
RESULTS = os.path.join(ROOT, "results")
#: CPU flags that decide which integer kernels a CPU has (onnxruntime, oneDNN, FBGEMM).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def results_path(name: str) -> str:
    """``results/<name>`` (the folder is created)."""
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, name)


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: Optional[int] = None) -> dict[str, Any]:
    """CPU model, the integer-kernel flags it has, threads, and the versions that decide the figures."""
    import torch

    from qwt_core.onnx_check import cpu_flags

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_name(), "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("torchvision", "timm", "onnxruntime", "onnx", "ultralytics", "mmdet"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # not installed in this layer
            info[mod] = None
    return info

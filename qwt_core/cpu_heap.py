"""Keep freed CPU memory in the process heap, so activations stop page-faulting on every forward.

A forward pass allocates its activations afresh. glibc's malloc serves a block at or above its
mmap threshold (dynamic, at most 32 MiB) with a new ``mmap`` and unmaps it on free, and trims the top
of the heap once more than its trim threshold is free. Each large activation is then a fresh
mapping, and the kernel page-faults and zero-fills every 4 KiB of it on first touch. The fake-quant
forward makes more large temporaries than the FP one, so it pays more. On the 2-core development host
(DeiT-S, batch 32 at 224²) a fresh 38 MiB ``x / Δ`` took 14 ms against 2 ms into memory already
in use. With the heap kept (:func:`retain_cpu_heap`) on that host (``benchmarks/cpu_heap_ab.py``,
one run, 32 images): fake-quant evaluation DeiT-S 2.81 → 2.21 s, Swin-T 4.42 → 2.64 s; Swin-T FP
3.44 → 2.13 s; ResNet-50's QwT stage 24.7 → 12.0 s.

The cost: the process keeps its peak heap (resident memory does not shrink after a large batch).
The setting is process-wide and is inherited by forked workers. The repository's command lines
switch it on for CPU runs (``--cpu_heap retain``, the default; ``--cpu_heap system`` leaves malloc
alone). Importing ``qwt_core`` never changes it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Literal

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: blocks below this come from the heap (1 GiB: every activation of a usual batch)
MMAP_THRESHOLD: int = 1 << 30
#: free memory the heap keeps at its top before giving it back (the largest C int)
TRIM_THRESHOLD: int = 2 ** 31 - 1

HeapMode = Literal["retain", "system"]
_mode: HeapMode = "system"


def _glibc() -> ctypes.CDLL:
    """The C library's handle when it is glibc; raises RuntimeError otherwise."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise RuntimeError(f"retaining the CPU heap needs glibc's mallopt (found {platform.system()} "
                           f"{platform.libc_ver()[0] or 'without glibc'}): use --cpu_heap system")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        raise RuntimeError("the C library has no mallopt: use --cpu_heap system")
    return libc


def retain_cpu_heap(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> None:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and never trim it below
    ``trim_threshold`` bytes of free space (glibc ``mallopt``), for the rest of the process.

    Raises ValueError for a bad threshold and RuntimeError where the C library is not glibc, both
    before anything changes; RuntimeError also if glibc refuses a value (the mmap threshold may then
    already be set, while :func:`cpu_heap_mode` still says ``"system"``).
    """
    global _mode
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= TRIM_THRESHOLD:
            raise ValueError(f"{name}={value!r}: use an int in [1, {TRIM_THRESHOLD}]")
    libc = _glibc()
    if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) != 1:
        raise RuntimeError(f"glibc refused M_MMAP_THRESHOLD={mmap_threshold}: pass a smaller "
                           "mmap_threshold or use --cpu_heap system")
    if libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) != 1:
        raise RuntimeError(f"glibc refused M_TRIM_THRESHOLD={trim_threshold}: use --cpu_heap system")
    _mode = "retain"


def cpu_heap_mode() -> HeapMode:
    """``"retain"`` after :func:`retain_cpu_heap` in this process, else ``"system"``."""
    return _mode

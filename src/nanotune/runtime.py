"""Process-wide settings that nanotune's own commands apply before heavy work.

Library code never calls these: changing the allocator is the program's decision, so the
training commands (`nanotune train`, `nanotune demo`) and the benchmark's nanotune training
cases do, and a Python program may too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Have glibc malloc keep freed blocks for reuse instead of unmapping them; True if applied.

    By default glibc serves blocks over 32 MiB (gradients, logits, activations of a training
    step) with fresh `mmap`s and returns them on free, so every step page-faults its working
    set back in: measured 15-20% of a GPT-2 full fine-tuning step on CPU
    (`benchmarks/NOTES.md`). Raising the mmap and trim thresholds lets the heap keep those
    pages; the training peak stays about the same (a step's allocations repeat). Not for
    generation: it churns little, and memory freed after loading would stay resident. No-op
    off glibc, or with `NANOTUNE_KEEP_FREED_MEMORY=0`.
    """
    if os.environ.get("NANOTUNE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = 1 << 30  # 1 GiB: larger blocks are rare and may still come and go by mmap
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))

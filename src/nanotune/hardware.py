"""What this machine's processor can do, read once: the CPU's model and feature flags, and
whether a device multiplies bfloat16 in hardware (what `train.dtype: auto` and the bench
header go by).

`NANOTUNE_NATIVE_BF16=0` makes `native_bf16` say no for the CPU, so `auto` trains in float32
everywhere (the test suite sets it: its parity and bit-exactness checks are float32).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features with bf16 dot products in hardware; without them oneDNN emulates bf16, slower
than float32."""


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The feature flags this CPU reports in /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The BF16_FLAGS this CPU has."""
    return [f for f in BF16_FLAGS if f in cpu_flags()]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware, so bf16 compute beats float32: a CUDA GPU
    with native bf16 (not the emulated bf16 torch also reports for a T4 or V100), or a CPU
    with AVX512_BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if os.environ.get("NANOTUNE_NATIVE_BF16") == "0":
        return False
    return device.type == "cpu" and bool(cpu_bf16_flags())

"""What each side hands the timer: a step function and the per-step inputs it was built for;
and how a worker reads its memory."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MARK = "RESULT "  # prefix of the one stdout line a worker reports on
LR = 1e-4  # AdamW learning rate, the same on both sides (other settings: torch defaults)
BETA = 0.1  # DPO's beta on both sides (TRL's default and nanotune's)


class NotApplicable(Exception):
    """A side cannot run this case here; the message says why and lands in the table."""


@dataclass
class Workload:
    """`step(inputs[i])` is step i; inputs are prepared before timing starts."""

    step: Callable[[Any], None]
    inputs: list[Any]


def rss(field: str) -> int | None:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak(device: str) -> str:
    """Start a new peak-memory span; returns how the peak will be read."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "cuda max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "RSS high-water mark"
    except OSError:
        return "maxrss (includes loading)"


def peak_since(device: str, how: str, baseline: int) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    if how == "RSS high-water mark":
        return (rss("VmHWM") or 0) - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline

"""What each side hands the timer: a step function and the per-step inputs it was built for;
and how a worker reads its memory."""

from __future__ import annotations

import resource
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MARK = "RESULT "  # prefix of the one stdout line a worker reports on
LR = 1e-4  # AdamW learning rate, the same on both sides (other settings: torch defaults)
BETA = 0.1  # DPO's beta on both sides (TRL's default and nanotune's)


PEER_BF16 = "peer-bf16"
"""The peer again under its own bf16 autocast (`torch.autocast(device, torch.bfloat16)`, what
`TrainingArguments(bf16=True)` does on CPU): ratios are taken against the faster peer run."""


OURS_COMPILED = "nanotune-compiled"
"""nanotune again with its steps through torch.compile: `train.compile: true` (the blocks'
forward and backward), `generate --compile`, `serve --compile`, `rl.compile: true` (the decode
step)."""

PEER_COMPILED = "peer-compile"
"""The peer in float32 through `torch.compile(model)`, what `TrainingArguments(torch_compile=True)`
does (inductor, its default mode): the third one-flag configuration ratios are taken against."""

COMPILED_SIDES = (OURS_COMPILED, PEER_COMPILED)


def side_precision(side: str, device: str) -> str:
    """What a side computes in: nanotune (compiled or not) what `train.dtype: auto` picks on this
    device (bf16 only where the hardware multiplies it natively), the peer float32 (compiled or
    not), peer-bf16 bfloat16."""
    if side in ("nanotune", OURS_COMPILED):
        from nanotune.training.config import TrainConfig
        from nanotune.training.trainer import compute_precision

        return compute_precision(TrainConfig(), torch.device(device))[0]
    return "bfloat16" if side == PEER_BF16 else "float32"


def in_precision(step: Callable[[Any], Any], device: str, precision: str) -> Callable[[Any], Any]:
    """`step` under bf16 autocast for bfloat16, as it is for float32."""
    if precision == "float32":
        return step

    def autocast_step(x: Any) -> Any:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return step(x)

    return autocast_step


class NotApplicable(Exception):
    """A side cannot run this case here; the message says why and lands in the table."""


@dataclass
class Workload:
    """`step(inputs[i])` is step i; inputs are prepared before timing starts."""

    step: Callable[[Any], Any]
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


def how_it_ended(proc: subprocess.CompletedProcess) -> str:
    """Why a process left no result: its last line on stderr (a Python error's message), or the
    signal that killed it (native code crashing, e.g. llama.cpp's SIGSEGV) and that last line."""
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if proc.returncode >= 0:
        return last or f"exit status {proc.returncode}"
    try:
        name = signal.Signals(-proc.returncode).name
    except ValueError:
        name = f"signal {-proc.returncode}"
    said = f"last on stderr: {last}" if last else "nothing on stderr"
    return f"died of {name} (exit status {proc.returncode}); {said}"

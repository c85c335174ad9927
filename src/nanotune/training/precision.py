"""The compute precision a run trains in, per device: float32, bfloat16 autocast, or float16
autocast with a loss scaler.

`train.dtype: auto` takes bfloat16 only where the device multiplies it in hardware (see
`hardware.native_bf16`): a GPU without native bf16 (T4, V100, the 10-series) gets float16
autocast instead, whose gradients are kept out of float16's narrow range by a `GradScaler`
(the loss is multiplied before backward, the gradients divided back before clipping, and a
step whose gradients overflowed is skipped with a smaller scale). A CPU without bf16 stays in
float32: its float16 products are emulated too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from nanotune.errors import NanotuneError
from nanotune.hardware import cpu_bf16_flags, native_bf16
from nanotune.training.config import TrainConfig

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _gpu_name(device: torch.device) -> str:
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    except (AssertionError, RuntimeError):  # no CUDA here (the unit tests fake the detection)
        return "this GPU"


def compute_precision(config: TrainConfig, device: torch.device) -> tuple[str, str]:
    """The precision `config.dtype` trains in on `device`, and why: auto is bfloat16 autocast
    where the device multiplies bf16 in hardware (a CUDA GPU with native bf16, a CPU with
    AVX512_BF16 or AMX); on a GPU without it float16 autocast with a loss scaler, on a CPU
    without it float32."""
    if config.dtype != "auto":
        return config.dtype, "train.dtype"
    found = native_bf16(device)
    if device.type == "cuda":
        name = _gpu_name(device)
        if found:
            return "bfloat16", f"train.dtype auto: {name} multiplies bf16 natively"
        return "float16", (
            f"train.dtype auto: {name} has no native bf16 (it would be emulated), so float16 "
            "autocast with a loss scaler"
        )
    if device.type == "cpu":
        flags = "/".join(cpu_bf16_flags())
        if found:
            why = f"this CPU has {flags}"
        else:
            why = "NANOTUNE_NATIVE_BF16=0" if flags else "this CPU has no AVX512_BF16 or AMX"
    else:
        why = f"no bf16 autocast on {device.type}"
    return ("bfloat16" if found else "float32"), f"train.dtype auto: {why}"


def autocast_for(
    config: TrainConfig, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """The compute precision of `config.dtype` on `device` (see `compute_precision`), as a
    context factory: bfloat16 or float16 autocast, or float32 without autocast."""
    precision = compute_precision(config, device)[0]
    if precision == "float32":
        return contextlib.nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def needs_grad_scaler(config: TrainConfig, device: torch.device) -> bool:
    """Whether a run scales its loss: under float16 autocast only (bf16 has float32's range)."""
    return compute_precision(config, device)[0] == "float16"


def grad_scaler_for(
    config: TrainConfig, device: torch.device, params: list[torch.nn.Parameter]
) -> torch.amp.GradScaler:
    """The loss scaler of a run (`needs_grad_scaler`; a disabled one passes everything through).

    float16 autocast keeps float32 master weights; trainable weights loaded in float16 would
    take float16 updates (and the scaler refuses their gradients), so that is refused here.
    """
    enabled = needs_grad_scaler(config, device)
    if enabled and any(p.dtype == torch.float16 for p in params):
        raise NanotuneError(
            "train.dtype float16: the trainable weights are float16, but float16 training keeps "
            "float32 master weights; load the model in float32 (model.dtype: float32)"
        )
    return torch.amp.GradScaler(device.type, enabled=enabled)

"""NF4 (4-bit NormalFloat) base weights through torchao: quantize, dequantize, measure."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.models.linear import linear as dense_linear

# What importing torchao logs that says nothing about NF4 (logger -> message fragment): its
# CUDA and MXFP8 extension libraries fail to load on builds without them, and torch deprecates
# the Enum pytree registration torchao does at import. NF4 is plain PyTorch, so both are
# dropped, during the import only; anything else torchao or torch logs still shows.
_IMPORT_NOISE = {"torchao": "Failed to load ", "torch.utils._pytree": "is an Enum subclass"}


class _Drop(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _torchao_nf4():
    """torchao's `to_nf4`, imported here only (torchao is optional, and slow to import)."""
    filters = [(logging.getLogger(n), _Drop(f)) for n, f in _IMPORT_NOISE.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        from torchao.quantization import to_nf4
    except ImportError as e:  # optional extra
        raise NanotuneError(
            "qlora needs torchao; install it with `pip install 'nanotune[qlora]'`"
        ) from e
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
    return to_nf4


def is_nf4(t: Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def quantize_nf4(weight: Tensor, block_size: int, where: str) -> Tensor:
    """NF4 copy of a 2-D weight; `where` names the layer in errors."""
    to_nf4 = _torchao_nf4()
    n = weight.numel()
    if n % block_size:
        raise NanotuneError(
            f"{where}: {n} weights are not a multiple of method.nf4_block={block_size}; "
            "pick a block size that divides every layer (64 fits all GPT-2 and Llama sizes)"
        )
    # torchao quantizes the per-block scales again in groups; the group must divide the number
    # of blocks. 256 is torchao's default, smaller groups only for tiny layers.
    scaler_block = math.gcd(n // block_size, 256)
    return to_nf4(
        weight.detach().contiguous(), block_size=block_size, scaler_block_size=scaler_block
    )


def dequantize(weight: Tensor) -> Tensor:
    """Plain tensor of a weight that may be NF4."""
    return weight.get_original_weight() if is_nf4(weight) else weight


class _NF4Linear(torch.autograd.Function):
    """x @ W^T for a frozen NF4 W: dequantized in forward and again in backward, never kept.

    torchao's `linear_nf4` does the same through `F.linear`; this one multiplies through
    `models.linear` (oneDNN for float32 on CPU).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.weight = weight  # the packed codes only: the dequantized copy is dropped
        return dense_linear(x, dequantize(weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return dense_linear(grad, dequantize(ctx.weight).to(grad.dtype).t()), None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`models.linear.linear` that also takes a frozen NF4 weight."""
    if is_nf4(weight):
        out = _NF4Linear.apply(x, weight)
        return out if bias is None else out + bias
    return dense_linear(x, weight, bias)


def storage_bytes(t: Tensor) -> int:
    """Bytes a tensor actually holds: for NF4 the packed codes, the scales and their scales."""
    if is_nf4(t):
        names, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held by NF4 weights, bytes the same weights take in float32)."""
    held = fp32 = 0
    for p in model.parameters():
        if is_nf4(p):
            held += storage_bytes(p)
            fp32 += p.numel() * 4
    return held, fp32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype: 'auto' is float32 on CPU (the reference numerics; bf16 is opt-in, and only
    fast where the CPU has AVX512-BF16/AMX) and bfloat16 on GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)

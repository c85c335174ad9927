"""How a model is prepared for decoding: the precision `generate`, `chat` and `serve` run in.

torch is imported where a model is converted, not at import: the CLI reads `DECODE_DTYPES` for
`--dtype`'s choices, and building its parser must stay light.
"""

from __future__ import annotations

import typing
from typing import Literal

from nanotune.errors import NanotuneError

if typing.TYPE_CHECKING:
    from torch import nn

DecodeDtype = Literal["float32", "bfloat16", "int8"]
DECODE_DTYPES: tuple[str, ...] = typing.get_args(DecodeDtype)
"""What `generate`, `chat` and `serve` may decode in (`--dtype`). bfloat16 holds activations,
weights (and the KV cache, except on CPU: `Transformer.cache_dtype`) in bf16, halving the weight
bytes a decode step streams (on CPU its linear weights are prepacked for oneDNN,
`models.linear.PackedLinear`); int8 (linear weights in int8 with per-channel scales,
`models.linear.Int8Linear`; the rest bfloat16) quarters them; logits and sampling stay float32,
and answers are no longer bit-equal to float32's."""


def for_decoding(model: nn.Module, dtype: str, *, pack: bool = True) -> nn.Module:
    """`model` (in place) in `dtype` for generation. A model holding LoRA adapters has them
    merged first (`jobs.artifacts.load(..., dtype=)` does), so they round once with the base.

    pack False leaves bfloat16 linear weights plain, for compiled decoding
    (`models.compiled_decode`): inductor cannot run oneDNN's opaque layout, and its own product
    on plain bf16 weights measured as fast compiled as the packed one eager (SmolLM2, batch 1:
    54 vs 52 tokens/s; batch 8: 368 vs 341; benchmarks/NOTES.md)."""
    import torch

    from nanotune.models.linear import pack_bf16, quantize_int8

    if dtype not in DECODE_DTYPES:
        raise NanotuneError(f"--dtype {dtype!r}: choose from {', '.join(DECODE_DTYPES)}")
    if dtype == "float32":
        return model
    if dtype == "int8":  # quantized from the float32 weights, before the rest goes to bf16
        quantize_int8(model)
    model = model.to(torch.bfloat16)
    if dtype == "bfloat16" and pack:  # oneDNN's layout, once, where it multiplies (CPU)
        pack_bf16(model)
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the heap pages the float32 weights were freed from back to the OS (glibc's
    `malloc_trim`; a no-op elsewhere): tensors of a few MB come from the heap, which keeps
    freed pages, so a model just converted would keep its float32 footprint in RSS."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's on Linux
    except (OSError, AttributeError, TypeError):
        pass

"""The linear layer every nanotune matmul goes through, with oneDNN on CPU.

PyTorch's CPU `F.linear` runs float32 through MKL's sgemm. On CPUs where MKL does not use the
full vector width (AMD Zen 4/5 among them) oneDNN's matmul is about twice as fast at the same
IEEE float32 precision, and its matrix-vector product (decoding at batch 1) about 2.8× - measured
in `benchmarks/NOTES.md`. `linear()` sends float32 CPU products of plain tensors to oneDNN
(forward, input gradient and weight gradient alike) and everything else to `F.linear`, so GPU,
reduced precision weights, NF4 and tensor subclasses are untouched.

Under CPU bfloat16 autocast (`train.dtype: bfloat16`, or `auto` where `hardware.native_bf16()`
says the CPU multiplies bf16 in hardware) the same oneDNN path multiplies in bf16 with float32
accumulation, as autocast would, with two differences: a frozen weight is cast once and its bf16
copy kept (autocast casts it again at every call: ~270 ms of a GPT-2 LoRA step), and backward
still keeps only what it needs. Trainable weights stay float32 masters; their bf16 casts are per
call.

Inside a compiled graph a float32 product without gradients of at least `COMPILED_ONEDNN_ROWS`
rows (a compiled decode step's batch) is the same oneDNN call as an opaque op
(`nanotune::onednn_linear`); inductor cannot lower the oneDNN op itself on unpacked weights.
Fewer rows, and products that need gradients, take `F.linear` there (MKL's addmm). Measured in
compiled engine steps on the AMX Xeon (benchmarks/NOTES.md): at batch 8 oneDNN 1.2x addmm for
GPT-2 (even for SmolLM2), at batch 1 addmm 1.3x (GPT-2) and 1.5x (SmolLM2) oneDNN.

`NANOTUNE_ONEDNN=0` turns the oneDNN path off (read once, at import).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary


def _onednn_available() -> bool:
    if os.environ.get("NANOTUNE_ONEDNN", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return False
    try:  # the op exists on every build with oneDNN; probe that it runs here
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(_mm(x, w), x @ w.T))
    except RuntimeError:
        return False


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) by oneDNN; x [..., in], weight [out, in] (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


COMPILED_ONEDNN_ROWS = 8
"""Rows from which a compiled float32 product goes to oneDNN rather than inductor's addmm."""


@torch.library.custom_op("nanotune::onednn_linear", mutates_args=())
def _compiled_mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`_mm` as one opaque op of a compiled graph (float32, no gradients)."""
    return _mm(x.contiguous(), weight, bias)


@_compiled_mm.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # Keep only what backward will use: a frozen weight needs no input, a frozen input
        # (the first layer's) no weight.
        ctx.save_for_backward(
            x if weight.requires_grad else None, weight if x.requires_grad else None
        )
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        g2 = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(grad, weight.t())  # grad @ weight
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            # oneDNN copies a transposed input (not a transposed weight) to contiguous, so
            # transpose whichever of grad and x is narrower: a LoRA B gradient copies the
            # [tokens, r] input instead of the [tokens, out] gradient.
            if g2.shape[1] <= x2.shape[1]:
                dw = _mm(g2.t(), x2.t())  # grad^T @ x
            else:
                dw = _mm(x2.t(), g2.t()).t().contiguous()  # (x^T @ grad)^T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def _onednn_dtype(x: Tensor, weight: Tensor, bias: Tensor | None) -> torch.dtype | None:
    """The dtype oneDNN multiplies this product in (float32, or bfloat16 under CPU bf16
    autocast), or None where `F.linear` should take it."""
    if not (
        ONEDNN
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and type(weight) in (Tensor, nn.Parameter)
        and type(x) is Tensor
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
    ):
        return None
    if torch.compiler.is_compiling():  # the opaque op: float32, no gradients, enough rows
        plain = x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        rows = x.numel() // x.shape[-1]
        use = plain and not torch.is_grad_enabled() and rows >= COMPILED_ONEDNN_ROWS
        return torch.float32 if use else None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    if torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (
        torch.float32,
        torch.bfloat16,
    ):
        return torch.bfloat16
    return None


_BF16_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""frozen float32 weight -> (its version when cast, its bfloat16 copy); an entry lives as long
as its weight, and an in-place change to the weight (merge, load) makes a fresh copy."""


def frozen_bf16(weight: Tensor) -> Tensor:
    """The bfloat16 copy of a frozen float32 weight, cast once and reused."""
    hit = _BF16_COPIES.get(weight)
    if hit is None or hit[0] != weight._version:
        hit = (weight._version, weight.detach().to(torch.bfloat16))
        _BF16_COPIES[weight] = hit
    return hit[1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where that is the faster path: float32
    exactly, or bfloat16 under CPU bf16 autocast."""
    dtype = _onednn_dtype(x, weight, bias)
    if dtype is None:
        return F.linear(x, weight, bias)
    if dtype == torch.bfloat16:
        x = x.to(dtype)
        weight = weight.to(dtype) if weight.requires_grad else frozen_bf16(weight)
        bias = None if bias is None else bias.to(dtype)
    x = x.contiguous()  # oneDNN reads its input densely (a no-op when it already is)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    if torch.compiler.is_compiling():
        return _compiled_mm(x, weight, bias)
    return _mm(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose product goes through `linear()`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


ONEDNN = _onednn_available()
ONEDNN_BF16 = ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
"""oneDNN multiplies bfloat16 on this CPU (AVX512BW/VL/DQ, AVX-NE-CONVERT or ARM BF16); where it
does not, `_reorder_linear_weight` refuses bf16 weights and `pack_bf16` leaves them alone."""


class Int8Linear(nn.Module):
    """A frozen linear layer for decoding: int8 weights with one scale per output channel
    (symmetric: absmax / 127), bias, scales and activations in bfloat16.

    Decoding at batch 1 is bound by reading the weights; int8 reads 1 byte per weight where
    float32 reads 4. On CPU the product is `torch._weight_int8pack_mm` (int8 weights, bf16
    activations, float accumulation), which needs in_features % 16 == 0; other shapes and
    devices multiply by the dequantized weight.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, dtype=torch.bfloat16) -> Int8Linear:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scales.to(dtype), None if bias is None else bias.detach().to(dtype))

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantized(self) -> Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).to(self.scales.dtype)
        if x.device.type == "cpu" and self.in_features % 16 == 0 and x.shape[0]:
            y = torch._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)
        else:
            y = x @ self.dequantized().T
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


class PackedLinear(nn.Module):
    """A frozen bfloat16 linear layer for decoding on CPU, its weight reordered once into
    oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`).

    `F.linear` on a bfloat16 weight reorders it at every call: at decode batch sizes that costs
    as much as the product, so a prepacked SmolLM2 decode step is 1.3-1.5x faster (measured in
    `benchmarks/NOTES.md`). The product is the same oneDNN kernel on the same values, so its
    output is bit-identical to `F.linear`'s. The packed tensor replaces the weight (no second
    copy, except for a head tied to the embedding, which keeps its table: SmolLM2's head costs
    57 MB more, for 3.2 instead of 5.6 ms a step); it is opaque (no views, no arithmetic), which
    decoding never needs. `weight` keeps the shape, dtype and device readers of a linear look
    at.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # A plain attribute, not a buffer: `Module.to()` and state dicts cannot handle the
        # opaque layout, and a decoding model is never moved or saved.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return _mm(x.to(torch.bfloat16).contiguous(), self.weight, self.bias)


def _packable(layer: nn.Linear) -> bool:
    """A plain bfloat16 linear on a CPU where oneDNN multiplies bf16."""
    return (
        ONEDNN_BF16
        and type(layer.weight) in (Tensor, nn.Parameter)
        and layer.weight.dtype == torch.bfloat16
        and layer.weight.device.type == "cpu"
        and (layer.bias is None or layer.bias.dtype == torch.bfloat16)
    )


def _replace_linears(model: nn.Module, make, where=lambda layer: True) -> nn.Module:
    """Replace every linear layer of `model` that `where` accepts (in place) by `make(weight,
    bias)`; a head tied to the embedding gets its own copy and the embedding keeps its table.
    Forward hooks move to the replacement (Gemma 2's output soft-cap is one)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and where(child):
                new = make(child.weight, child.bias)
                new._forward_hooks.update(child._forward_hooks)
                setattr(module, name, new)
    return model


def pack_bf16(model: nn.Module) -> nn.Module:
    """Every plain bf16 linear layer of `model` as a `PackedLinear`, where oneDNN multiplies
    bf16 (elsewhere the model is left as it is)."""
    return _replace_linears(model, PackedLinear, _packable)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every linear layer of `model` as an `Int8Linear` of its weights."""
    return _replace_linears(model, Int8Linear.quantize)

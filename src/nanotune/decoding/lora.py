"""Many LoRA adapters over one base model, chosen per row of a batch; and frozen decode copies of
a model's own LoRA layers for a sampling phase (GRPO).

`ServedLinear` wraps one block linear of the base. Every forward runs the base matmul once for
the whole batch, then adds each adapter's delta `(x @ A.T) @ (scale * B).T` to the rows that use
that adapter: the same two products `LoRALinear` adds, so a row's output does not depend on what
the other rows use. Which rows use which adapter is set once per forward on the shared `Routing`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from nanotune.models.linear import ONEDNN_BF16, PackedLinear, linear
from nanotune.models.transformer import Transformer

# The block linears an adapter may target (see models.names.HF_MODULES).
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


class Routing:
    """Which adapter each row of the next forward uses: (adapter id, row indices or None for
    every row) per adapter present; rows on the bare base are in no group."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, Tensor | None]] = []


class ServedLinear(nn.Module):
    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.pairs: dict[int, tuple[Tensor, Tensor]] = {}  # adapter id -> (A, scale * B)
        # What readers of a linear look at (weights.peft checks adapter shapes against these).
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for adapter, rows in self.routing.groups:
            pair = self.pairs.get(adapter)
            if pair is None:  # this adapter leaves this linear alone
                continue
            a, b = pair
            if rows is None:
                out = out + linear(linear(x, a), b).to(out.dtype)
            else:
                delta = linear(linear(x[rows], a), b).to(out.dtype)
                out = out.index_add(0, rows, delta)
        return out


def serve_adapters(model: Transformer) -> Routing:
    """Wrap every block linear of `model` (in place) so adapters can be added per id; the
    routing object that picks them for each forward."""
    routing = Routing()
    for block in model.blocks:
        for path in BLOCK_LINEARS:
            parent, leaf = path.split(".")
            owner = getattr(block, parent)
            layer = getattr(owner, leaf)
            if not isinstance(layer, ServedLinear):
                setattr(owner, leaf, ServedLinear(layer, routing))
    return routing


def served_layers(model: Transformer) -> dict[str, ServedLinear]:
    """The wrapped linears by their path in the unwrapped model (`blocks.3.attn.qkv`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ServedLinear)}


# ---- decode copies for a sampling phase ---------------------------------------------------------


def _is_lora(module: nn.Module) -> bool:
    """A LoRA layer (`methods.lora.LoRALinear`, read by its interface: decoding sits below
    methods) with adapters switched on."""
    return (
        bool(getattr(module, "adapters", None))
        and getattr(module, "enabled", False)
        and (callable(getattr(module, "merged_weight", None)))
    )


class _ScaledB(nn.Module):
    """A float LoRA layer's forward with its scaled B computed once: the same products on the
    same values as the layer's own (bit-identical), without `scaled_b` at every call."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.a = layer.weight, layer.bias, layer.lora_A
        self.b = layer.scaled_b().detach()
        self.lora_dtype = layer.lora_dtype

    def forward(self, x: Tensor) -> Tensor:
        out = linear(x, self.weight, self.bias)
        return out + linear(linear(x.to(self.lora_dtype), self.a), self.b).to(out.dtype)


class _Bf16Linear(nn.Module):
    """A frozen bf16 linear with a plain weight: what a compiled decode step multiplies
    (inductor cannot run oneDNN's packed layout, `models.decoding.for_decoding`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias)


def _bf16_copy(layer: nn.Module, packed: bool) -> nn.Module:
    """A frozen bf16 copy of a LoRA layer (W + scale * B @ A, DoRA's rescale and NF4's
    dequantization included) or of a plain float linear, packed for oneDNN or plain."""
    w = layer.merged_weight() if _is_lora(layer) else layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
    copy = (PackedLinear if packed else _Bf16Linear)(w.to(torch.bfloat16), bias)
    copy._forward_hooks.update(layer._forward_hooks)  # Gemma 2's logit soft-cap on the head
    return copy


def _plain_float(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return type(w) in (Tensor, nn.Parameter) and w.dtype == torch.float32


@contextlib.contextmanager
def decode_copies(model: nn.Module, compiled: bool = False) -> Iterator[nn.Module]:
    """While inside, `model` decodes through frozen copies of its linear layers made once, for a
    sampling phase during training (GRPO's), when no weight changes between tokens; on exit
    the layers are put back and the copies freed.

    Under CPU bfloat16 autocast where oneDNN multiplies bf16: each LoRA layer becomes its
    merged weight rounded to bf16 and each other float linear (the head included) its bf16
    weight, both packed into oneDNN's layout (`models.linear.PackedLinear`): one product per
    layer instead of three, and no cast of A, B or the weights, nor a reorder of the weight, at
    each call. This is how `nanotune generate --dtype bfloat16` decodes an adapter (merged in
    float32, then rounded); a step's logits differ from the live layers' bf16 ones by rounding.
    Otherwise (float32): LoRA layers keep their exact products with the scaled B computed once
    (bit-identical to the live layers, so sampling equals `nanotune generate`'s).

    compiled: the copies run in compiled decode steps (`Engine(compile=True)`): the bf16 copies
    keep plain weights, which inductor multiplies itself, instead of oneDNN's packed layout."""
    bf16 = (
        ONEDNN_BF16
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        with torch.no_grad():
            for module in list(model.modules()):
                if _is_lora(module):
                    continue  # its own children are its parameters' holders
                for name, child in list(module.named_children()):
                    copy: nn.Module | None = None
                    if bf16 and getattr(child, "weight", None) is not None:
                        if child.weight.device.type == "cpu" and (
                            _is_lora(child)
                            or (isinstance(child, nn.Linear) and _plain_float(child))
                        ):
                            copy = _bf16_copy(child, packed=not compiled)
                    elif _is_lora(child) and _plain_float(child):
                        if not any(a.dora for a in child.adapters):
                            copy = _ScaledB(child)
                    if copy is not None:
                        setattr(module, name, copy)
                        swapped.append((module, name, child))
        yield model
    finally:
        for module, name, child in reversed(swapped):
            setattr(module, name, child)

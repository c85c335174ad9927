"""Many LoRA adapters over one base model, chosen per row of a batch.

`ServedLinear` wraps one block linear of the base. Every forward runs the base matmul once for
the whole batch, then adds each adapter's delta `(x @ A.T) @ (scale * B).T` to the rows that use
that adapter: the same two products `LoRALinear` adds, so a row's output does not depend on what
the other rows use. Which rows use which adapter is set once per forward on the shared `Routing`.
"""

from __future__ import annotations

from torch import Tensor, nn

from nanotune.models.linear import linear
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

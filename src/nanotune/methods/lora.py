"""LoRA and DoRA adapters on output-row slices of a (possibly NF4) linear, and their merge.

One `LoRALinear` replaces one decoder linear. It holds any number of adapters, each on a slice of
the output rows: the whole matrix (GPT-2 `c_attn` = all of `attn.qkv`, one shared A as PEFT does)
or a part (Llama `q_proj` = the q rows of `attn.qkv`). The A matrices of all adapters are stored
concatenated so the input is multiplied once (`x @ A_all^T`), then each B maps its rank slice.
Math follows PEFT (`peft.tuners.lora`) so adapters move between the two exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.methods import nf4
from nanotune.models.config import ModelConfig
from nanotune.models.linear import Linear, linear
from nanotune.models.names import HF_MODULES


@dataclass
class Adapter:
    """Where one low-rank pair sits: output rows [start, end), its rank rows in `lora_A`."""

    name: str  # "all" for the whole matrix, else the slice name (q, k, v, gate, up)
    start: int
    end: int
    r: int
    a_offset: int
    alpha: float
    rslora: bool
    dora: bool

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """Frozen base linear (float or NF4) plus LoRA/DoRA adapters on row slices of its output."""

    def __init__(
        self, base: nn.Linear, *, quantize_block: int | None = None, where: str = ""
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight.detach()
        if quantize_block:
            w = nf4.quantize_nf4(w, quantize_block, where)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = (
            None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        )
        self.adapters: list[Adapter] = []
        self.enabled = True
        """False: the layer is its base linear alone (`adapters_disabled`)."""
        self.register_parameter("lora_A", None)
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout: nn.Module = nn.Identity()

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def add_adapter(
        self,
        name: str,
        rows: tuple[int, int],
        r: int,
        alpha: float,
        *,
        rslora: bool = False,
        dora: bool = False,
        dropout: float = 0.0,
    ) -> Adapter:
        """Add a zero-init pair (A kaiming-uniform, B zeros, as PEFT) on output rows `rows`."""
        start, end = rows
        for a in self.adapters:
            if start < a.end and a.start < end:
                raise NanotuneError(
                    f"LoRA targets overlap on the same rows ({a.name!r} and {name!r}); "
                    "target either the whole module or its slices, not both"
                )
        dev, dt = self.weight.device, self.lora_dtype
        new_a = torch.empty(r, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))
        old = self.lora_A.data if self.lora_A is not None else new_a[:0]
        self.lora_A = nn.Parameter(torch.cat([old, new_a]))
        self.lora_B[name] = nn.Parameter(torch.zeros(end - start, r, device=dev, dtype=dt))
        adapter = Adapter(name, start, end, r, old.shape[0], alpha, rslora, dora)
        self.adapters.append(adapter)
        if dora:
            # Magnitude = row norms of W + scale*B@A; B is zero, so the norms of W.
            self.lora_magnitude[name] = nn.Parameter(self._weight_norm(adapter).to(dt))
        if dropout > 0:
            self.lora_dropout = nn.Dropout(dropout)
        return adapter

    def a_of(self, adapter: Adapter) -> Tensor:
        return self.lora_A[adapter.a_offset : adapter.a_offset + adapter.r]

    def delta_weight(self, adapter: Adapter) -> Tensor:
        """scale * B @ A for one adapter: [rows, in]."""
        return adapter.scale * (self.lora_B[adapter.name] @ self.a_of(adapter))

    def _weight_norm(self, adapter: Adapter) -> Tensor:
        # PEFT's DoRA: row norms of W + scale*B@A, never differentiated (DoRA paper, 4.3).
        with torch.no_grad():
            w = nf4.dequantize(self.weight)[adapter.start : adapter.end].to(self.lora_dtype)
            return torch.linalg.norm(w + self.delta_weight(adapter), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        out = nf4.linear(x, self.weight, self.bias)
        if not self.adapters or not self.enabled:
            return out
        dropped = self.training and isinstance(self.lora_dropout, nn.Dropout)
        xd = self.lora_dropout(x) if dropped else x
        h = linear(xd.to(self.lora_dtype), self.lora_A)  # every adapter's A in one matmul
        if not any(a.dora for a in self.adapters):
            # Every B, scaled, at its rows and rank columns of one [out, r_all] matrix: one
            # matmul adds all adapters (the zero blocks add exact zeros).
            return out + linear(h, self.scaled_b()).to(out.dtype)
        # DoRA rescales each slice by its own magnitude: one product per adapter, joined (with
        # zeros between slices) and added out of place, since the base product may come from a
        # custom autograd Function, whose outputs are not modified in place.
        pieces, pos = [], 0
        for a in sorted(self.adapters, key=lambda a: a.start):
            lora = linear(h[..., a.a_offset : a.a_offset + a.r], self.lora_B[a.name])
            if a.dora:
                lora = self._dora(a, xd if dropped else None, out, lora)
            else:
                lora = lora * a.scale
            if a.start > pos:
                pieces.append(out.new_zeros(*out.shape[:-1], a.start - pos))
            pieces.append(lora.to(out.dtype))
            pos = a.end
        if pos < self.out_features:
            pieces.append(out.new_zeros(*out.shape[:-1], self.out_features - pos))
        return out + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))

    def scaled_b(self) -> Tensor:
        """[out, r_all]: each adapter's scale * B at its output rows and its columns of A."""
        first = self.adapters[0]
        if len(self.adapters) == 1 and (first.start, first.end) == (0, self.out_features):
            return self.lora_B[first.name] * first.scale
        b = self.lora_A.new_zeros(self.out_features, self.lora_A.shape[0])
        for a in self.adapters:
            b[a.start : a.end, a.a_offset : a.a_offset + a.r] = self.lora_B[a.name] * a.scale
        return b

    def _dora(self, a: Adapter, xd: Tensor | None, out: Tensor, lora: Tensor) -> Tensor:
        """PEFT's DoraLinearLayer.forward: (m/|W+dW| - 1) * W x + m/|W+dW| * scale * B A x."""
        mag_scale = self.lora_magnitude[a.name] / self._weight_norm(a)
        if xd is None:
            base = out[..., a.start : a.end]
            base = base - self.bias[a.start : a.end] if self.bias is not None else base.clone()
        else:  # dropout active: PEFT recomputes the base product on the dropped-out input
            w = nf4.dequantize(self.weight)[a.start : a.end]
            base = linear(xd, w.to(xd.dtype))
        return (mag_scale - 1) * base.to(lora.dtype) + mag_scale * lora * a.scale

    def merged_weight(self) -> Tensor:
        """W with every adapter folded in (DoRA: rows rescaled to the learned magnitude)."""
        with torch.no_grad():
            w = nf4.dequantize(self.weight).to(self.lora_dtype).clone()
            for a in self.adapters:
                rows = w[a.start : a.end] + self.delta_weight(a)
                if a.dora:
                    norm = torch.linalg.norm(rows, dim=1)
                    rows = (self.lora_magnitude[a.name] / norm)[:, None] * rows
                w[a.start : a.end] = rows
            return w

    def to_linear(self) -> nn.Linear:
        w = self.merged_weight()
        lin = Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        ads = ", ".join(
            f"{a.name}[{a.start}:{a.end}] r={a.r}{' dora' if a.dora else ''}" for a in self.adapters
        )
        q = " nf4" if nf4.is_nf4(self.weight) else ""
        return f"in={self.in_features}, out={self.out_features}{q}, adapters: {ads or 'none'}"


# ---- target names ----------------------------------------------------------------------------


def module_slices(config: ModelConfig, module: str) -> dict[str, tuple[int, int]]:
    """Row slices of a decoder linear that a target may name (empty: only the whole matrix)."""
    if module == "attn.qkv":
        return config.qkv_slices
    if module == "mlp.fc" and config.mlp in ("swiglu", "geglu"):
        return config.fc_slices
    return {}


def module_rows(
    config: ModelConfig, module: str, part: str | None, out_features: int
) -> tuple[int, int]:
    return module_slices(config, module)[part] if part else (0, out_features)


def target_names(config: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """Every block-relative Hugging Face name a target may match -> (module, slice or None)."""
    names = dict(HF_MODULES[config.family])
    for hf, (module, part) in HF_MODULES[config.family].items():
        if part is None:
            for s in module_slices(config, module):
                names[f"{hf}.{s}"] = (module, s)
    return names


def resolve_targets(
    config: ModelConfig, targets: list[str] | str
) -> list[tuple[str, str | None, str]]:
    """Targets -> sorted (module, slice, hf_name); suffix matching as PEFT's target_modules."""
    names = target_names(config)
    if targets == "all-linear":
        chosen = {hf: m for hf, m in HF_MODULES[config.family].items()}
    else:
        chosen = {}
        for t in targets:
            hits = {hf: m for hf, m in names.items() if hf == t or hf.endswith("." + t)}
            if not hits:
                valid = sorted(set(names) | {n.split(".", 1)[1] for n in names})
                raise NanotuneError(
                    f"method.targets: {t!r} matches no module of this {config.family} model; "
                    f"valid names: {', '.join(valid)}, or 'all-linear'"
                )
            chosen.update(hits)
    return sorted(((m, s, hf) for hf, (m, s) in chosen.items()), key=lambda x: (x[0], x[1] or ""))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return model.get_submodule(head), leaf


def wrap_linear(body: nn.Module, path: str, quantize_block: int | None = None) -> LoRALinear:
    """Replace the nn.Linear at `path` by a LoRALinear (idempotent)."""
    parent, leaf = _parent(body, path)
    layer = getattr(parent, leaf)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer, quantize_block=quantize_block, where=path)
        setattr(parent, leaf, layer)
    return layer


def apply_lora(
    body: nn.Module,
    targets: list[str] | str,
    r: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    rslora: bool = False,
    dora: bool = False,
    quantize_block: int | None = None,
) -> nn.Module:
    """Add adapters to every block of a Transformer `body`; with `quantize_block` every block
    linear (adapted or not) gets NF4 base weights."""
    config: ModelConfig = body.config
    resolved = resolve_targets(config, targets)
    for i in range(config.n_layer):
        if quantize_block:
            for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
                wrap_linear(body, f"blocks.{i}.{m}", quantize_block)
        for module, part, _ in resolved:
            layer = wrap_linear(body, f"blocks.{i}.{module}")
            rows = module_rows(config, module, part, layer.out_features)
            layer.add_adapter(
                part or "all", rows, r, alpha, rslora=rslora, dora=dora, dropout=dropout
            )
    return body


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model without its adapters while inside: every LoRALinear computes its base linear
    alone (DPO's reference policy, with no second copy of the model). Trained embeddings or
    heads stay as they are; only the adapters are switched off."""
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; LoRALinear layers become plain nn.Linear
    (NF4 bases are dequantized first)."""
    for path, layer in lora_layers(model).items():
        parent, leaf = _parent(model, path)
        setattr(parent, leaf, layer.to_linear())
    return model

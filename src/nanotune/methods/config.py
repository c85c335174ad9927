"""MethodConfig: which parameters a fine-tuning run trains, and how."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, get_args

from nanotune.errors import NanotuneError

Method = Literal["full", "last_n", "lora", "dora", "qlora"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
METHODS = get_args(Method)
COMPUTE_DTYPES = get_args(ComputeDtype)


@dataclass
class MethodConfig:
    """How to fine-tune: which parameters train. Validated on construction (NanotuneError)."""

    name: Method = "lora"
    """full: every weight; last_n: the last `last_n` blocks + final norm; lora; dora (LoRA with a
    learned magnitude, as PEFT's `use_dora`); qlora (NF4 base weights + LoRA)."""
    last_n: int = 2
    """last_n: number of final blocks trained; embeddings stay frozen."""
    r: int = 8
    """LoRA rank (lora, dora, qlora)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with `rslora`)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""
    targets: Literal["all-linear"] | list[str] = "all-linear"
    """all-linear (every linear of every block, never lm_head), or module names matched by
    suffix as PEFT does.

    GPT-2: `c_attn`, `c_proj`, `attn.c_proj`, `c_fc`, `mlp.c_proj`, `c_attn.q`/`.k`/`.v` for
    separate pairs on slices of the fused c_attn; Llama: `q_proj` … `down_proj`; Phi-3:
    `qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj` (`qkv_proj.q`, `gate_up_proj.up`, … for
    slices); GPT-NeoX: `query_key_value` (`.q`/`.k`/`.v`), `dense`, `dense_h_to_4h`,
    `dense_4h_to_h`."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""
    dora: bool = False
    """Weight-decomposed LoRA (implied by name: dora)."""
    train_embeddings: bool = False
    """Also train the whole token embedding (and an untied lm_head); needed when special tokens
    were added."""
    quant: Literal["nf4"] = "nf4"
    """qlora: base-weight format."""
    nf4_block: int = 64
    """qlora: NF4 quantization block, values per absmax scale (was `block_size`)."""
    compute_dtype: ComputeDtype = "auto"
    """qlora: dtype of LoRA weights and activations; auto = float32 on CPU, bfloat16 on GPU."""

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            close = difflib.get_close_matches(str(self.name), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NanotuneError(
                f"method.name: {self.name!r} is not one of {', '.join(METHODS)}{hint}"
            )
        if self.name == "dora":
            self.dora = True
        if self.name == "last_n" and (not isinstance(self.last_n, int) or self.last_n < 1):
            raise NanotuneError(f"method.last_n must be a positive integer, got {self.last_n!r}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise NanotuneError(f"method.r (LoRA rank) must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise NanotuneError(f"method.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise NanotuneError(f"method.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                raise NanotuneError(
                    f"method.targets: {self.targets!r} is not all-linear; module names are a "
                    f"list, e.g. [{self.targets}]"
                )
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise NanotuneError(
                f"method.targets must be 'all-linear' or a non-empty list of module names, "
                f"got {self.targets!r}"
            )
        if self.quant != "nf4":
            raise NanotuneError(f"method.quant {self.quant!r} is unknown; only 'nf4' is supported")
        if not isinstance(self.nf4_block, int) or self.nf4_block <= 0 or self.nf4_block % 2:
            raise NanotuneError(
                f"method.nf4_block must be a positive even integer, got {self.nf4_block!r}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise NanotuneError(
                f"method.compute_dtype {self.compute_dtype!r} is unknown; use one of "
                f"{', '.join(COMPUTE_DTYPES)}"
            )

    @property
    def uses_lora(self) -> bool:
        return self.name in ("lora", "dora", "qlora")

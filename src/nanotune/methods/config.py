"""MethodConfig: which parameters a fine-tuning run trains, and how."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nanotune.errors import NanotuneError

METHODS = ("full", "last_n", "lora", "dora", "qlora")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class MethodConfig:
    """How to fine-tune. Validated on construction; every bad value raises NanotuneError.

    Fields:
      name: full (every weight), last_n (the last `last_n` blocks + final norm), lora, dora
        (LoRA with a learned magnitude, as PEFT's `use_dora`), qlora (NF4 base weights + LoRA).
      last_n: number of final blocks trained by `last_n`; embeddings stay frozen.
      r: LoRA rank (lora, dora, qlora).
      alpha: LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with `rslora`).
      dropout: dropout on the LoRA input, in [0, 1).
      targets: Hugging Face module names matched by suffix as PEFT does (GPT-2 `c_attn`,
        `c_proj`, `attn.c_proj`, `c_fc`, `mlp.c_proj`, `c_attn.q`/`.k`/`.v` for separate pairs on
        slices of the fused c_attn; Llama `q_proj` ... `down_proj`), or "all-linear" for every
        linear of every block (never lm_head).
      rslora: rank-stabilised scaling alpha/sqrt(r).
      dora: weight-decomposed LoRA (implied by name "dora").
      train_embeddings: also train the whole token embedding (and an untied lm_head); needed
        when special tokens were added.
      quant: base-weight format for qlora; only "nf4".
      block_size: NF4 quantization block (values per absmax scale).
      compute_dtype: dtype of LoRA weights and activations under qlora; "auto" is float32 on
        CPU and bfloat16 on GPU.
    """

    name: str = "lora"
    last_n: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["c_attn"])
    rslora: bool = False
    dora: bool = False
    train_embeddings: bool = False
    quant: str = "nf4"
    block_size: int = 64
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise NanotuneError(
                f"method.name {self.name!r} is unknown; use one of {', '.join(METHODS)}"
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
                self.targets = [self.targets]
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise NanotuneError(
                f"method.targets must be 'all-linear' or a non-empty list of module names, "
                f"got {self.targets!r}"
            )
        if self.quant != "nf4":
            raise NanotuneError(f"method.quant {self.quant!r} is unknown; only 'nf4' is supported")
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 2:
            raise NanotuneError(
                f"method.block_size must be a positive even integer, got {self.block_size!r}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise NanotuneError(
                f"method.compute_dtype {self.compute_dtype!r} is unknown; use one of "
                f"{', '.join(COMPUTE_DTYPES)}"
            )

    @property
    def uses_lora(self) -> bool:
        return self.name in ("lora", "dora", "qlora")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "method") -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NanotuneError(
                f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**d)

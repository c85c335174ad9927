"""Tiny decoder configs shared by the tests: each family's preset layers at toy sizes."""

from __future__ import annotations

from typing import Any

from nanotune.models import PRESETS, ModelConfig

_SIZES: dict[str, Any] = dict(
    block_size=64, n_layer=2, n_head=4, n_embd=32, bos_token_id=None, eos_token_id=None
)


def tiny_config(family: str = "gpt2", **overrides: Any) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, GELU, biases, tied head. Llama: RoPE, RMSNorm,
    SwiGLU, grouped-query attention (4 heads, 2 kv heads), untied head."""
    if family == "gpt2":
        base = PRESETS["gpt2"].config.with_(vocab_size=96, **_SIZES)
    else:
        base = PRESETS["smollm2-135m-instruct"].config.with_(
            vocab_size=96,
            n_kv_head=2,
            intermediate_size=64,
            rope_theta=10000.0,
            tie_embeddings=False,
            **_SIZES,
        )
    return base.with_(**overrides)

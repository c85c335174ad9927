"""Hugging Face names of nanotune's modules, per family: what LoRA targets and adapter files say.

Lives with the models (not with the file formats) so that `methods/` needs only `models/`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nanotune.models.config import ModelConfig

# Where each Hugging Face module name lives in nanotune: (module path, slice name or None).
# Used by LoRA targets and the PEFT adapter format.
HF_MODULES: dict[str, dict[str, tuple[str, str | None]]] = {
    "gpt2": {
        "attn.c_attn": ("attn.qkv", None),
        "attn.c_proj": ("attn.proj", None),
        "mlp.c_fc": ("mlp.fc", None),
        "mlp.c_proj": ("mlp.proj", None),
    },
    "llama": {
        "self_attn.q_proj": ("attn.qkv", "q"),
        "self_attn.k_proj": ("attn.qkv", "k"),
        "self_attn.v_proj": ("attn.qkv", "v"),
        "self_attn.o_proj": ("attn.proj", None),
        "mlp.gate_proj": ("mlp.fc", "gate"),
        "mlp.up_proj": ("mlp.fc", "up"),
        "mlp.down_proj": ("mlp.proj", None),
    },
}

# The Llama-derived families (Gemma included) name their linears as Llama does.
HF_MODULES |= {
    f: HF_MODULES["llama"] for f in ("qwen2", "qwen3", "mistral", "smollm3", "gemma2", "gemma3")
}
# Phi-3 and GPT-NeoX fuse in their checkpoints what nanotune fuses, so each HF module is a whole
# nanotune linear: a LoRA on `qkv_proj` is one pair on `attn.qkv`, exactly as PEFT computes it
# (nanotune's pairs on the q/k/v slices go out as one block-structured pair, as GPT-2's do).
HF_MODULES["phi3"] = {
    "self_attn.qkv_proj": ("attn.qkv", None),
    "self_attn.o_proj": ("attn.proj", None),
    "mlp.gate_up_proj": ("mlp.fc", None),
    "mlp.down_proj": ("mlp.proj", None),
}
HF_MODULES["gpt_neox"] = {
    "attention.query_key_value": ("attn.qkv", None),
    "attention.dense": ("attn.proj", None),
    "mlp.dense_h_to_4h": ("mlp.fc", None),
    "mlp.dense_4h_to_h": ("mlp.proj", None),
}

HF_BLOCK_PREFIX = {family: "model.layers.{i}." for family in HF_MODULES}
HF_BLOCK_PREFIX["gpt2"] = "transformer.h.{i}."
HF_BLOCK_PREFIX["gpt_neox"] = "gpt_neox.layers.{i}."


def hf_row_order(config: ModelConfig, module: str) -> Tensor | None:
    """Where the HF checkpoint's output rows of a nanotune linear come from, or None where they
    are in nanotune's order: `hf = ours[order]`, `ours = hf[order.argsort()]`.

    GPT-NeoX's fused query_key_value interleaves per head ([head, q/k/v, head dim]); nanotune's
    `attn.qkv` holds [q/k/v, head, head dim] as every other family. A weight, bias, LoRA B or DoRA
    magnitude moves between the two by this row permutation alone (A, the input side, stays)."""
    if config.family != "gpt_neox" or module != "attn.qkv":
        return None
    H, D = config.n_head, config.hd
    return torch.arange(3 * H * D).view(3, H, D).transpose(0, 1).reshape(-1)

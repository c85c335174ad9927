"""Hugging Face names of nanotune's modules, per family: what LoRA targets and adapter files say.

Lives with the models (not with the file formats) so that `methods/` needs only `models/`.
"""

from __future__ import annotations

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

HF_BLOCK_PREFIX = {family: "model.layers.{i}." for family in HF_MODULES}
HF_BLOCK_PREFIX["gpt2"] = "transformer.h.{i}."

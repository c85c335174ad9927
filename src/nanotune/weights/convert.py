"""Key-name and config maps between Hugging Face checkpoints and nanotune's decoder.

nanotune fuses q/k/v into `attn.qkv` and (for SwiGLU) gate/up into `mlp.fc` for every family;
these maps split and join them. GPT-2's Conv1D stores weights as [in, out]: transposed here.
Qwen2, Qwen3, Mistral and SmolLM3 checkpoints are Llama's tensor names plus Qwen3's
`q_norm`/`k_norm`; their configs differ in the flags `config_from_hf` reads. Gemma 2 and 3 add
the pre/post-feedforward and post-attention norms (held as they are stored: zero-centred).
Phi-3 stores q/k/v and gate/up fused as nanotune does (`qkv_proj`, `gate_up_proj`: copied as they
are). GPT-NeoX (`gpt_neox.*`, head `embed_out`) fuses q/k/v per head, its rows permuted to
nanotune's order here (`names.hf_row_order`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nanotune.errors import NanotuneError
from nanotune.models.config import ModelConfig
from nanotune.models.names import hf_row_order

GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# HF model_type (= nanotune family) -> the class transformers builds for it.
ARCHITECTURES = {
    "gpt2": "GPT2",
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "smollm3": "SmolLM3",
    "gemma2": "Gemma2",
    "gemma3": "Gemma3",
    "phi3": "Phi3",
    "gpt_neox": "GPTNeoX",
}
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "phi3")
# GPT-NeoX's hidden_act -> nanotune's MLP: "gelu" is the exact (erf) GELU there.
NEOX_ACTS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
# HF model_type -> nanotune family, where they differ.
GEMMA_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}
# nanotune block norm -> HF name, for the families with Gemma's four norms per block.
GEMMA_NORMS = {
    "norm1": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "norm2": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (GPT-2, Llama or a Llama-derived family)."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return ModelConfig(
            family="gpt2",
            vocab_size=hf["vocab_size"],
            block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            intermediate_size=hf.get("n_inner"),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            positions="learned",
            mlp="gelu",
            attn_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
    if model_type in LLAMA_LIKE:
        if hf.get("hidden_act", "silu") != "silu":
            raise NanotuneError(
                f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)"
            )
        eos = hf.get("eos_token_id")
        return ModelConfig(
            family=model_type,
            vocab_size=hf["vocab_size"],
            block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            positions="rope",
            rope_theta=hf.get(
                "rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            ),
            rope_scaling=(
                _longrope_scaling(hf, where) if model_type == "phi3" else _rope_scaling(hf, where)
            ),
            partial_rotary_factor=_partial_rotary(hf) if model_type == "phi3" else 1.0,
            mlp="swiglu",
            attn_bias=hf.get("attention_bias", False) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2",  # Qwen2 always has them, and none on o_proj
            qk_norm=model_type == "qwen3",
            mlp_bias=hf.get("mlp_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            **_windows(hf, model_type, where),
            nope_layers=_nope_layers(hf) if model_type == "smollm3" else (),
        )
    if model_type in GEMMA_TYPES:
        return _gemma_config(hf, GEMMA_TYPES[model_type], where)
    if model_type == "gpt_neox":
        return _neox_config(hf, where)
    if model_type == "gemma3":
        raise NanotuneError(
            f"{where}: a multimodal Gemma 3 (model_type 'gemma3', with a vision tower); nanotune "
            "loads the text-only checkpoints (model_type 'gemma3_text': gemma-3-270m, gemma-3-1b)"
        )
    raise NanotuneError(
        f"{where}: model_type {model_type!r} is not supported; nanotune loads the families "
        f"{', '.join(repr(f) for f in ARCHITECTURES)} (config.json's model_type)"
    )


def _gemma_config(hf: dict[str, Any], family: str, where: str) -> ModelConfig:
    """Gemma 2 / Gemma 3 (text): Llama plus Gemma's flags. Local (sliding) and global layers
    alternate (Gemma 2) or come five to one (Gemma 3) unless `layer_types` names them; Gemma 3's
    local layers rotate with their own base."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise NanotuneError(
            f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)"
        )
    if hf.get("use_bidirectional_attention"):
        raise NanotuneError(
            f"{where}: bidirectional attention (an embedding model) is not supported"
        )
    n = hf["num_hidden_layers"]
    every = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)
    ]
    window = hf.get("sliding_window")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    params = hf.get("rope_parameters") or {}
    if family == "gemma3":
        global_, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        theta = hf.get("rope_theta", global_.get("rope_theta", 1_000_000.0))
        local_theta = hf.get("rope_local_base_freq", local.get("rope_theta", 10_000.0))
        scaling = _rope_scaling({"rope_scaling": hf.get("rope_scaling") or global_}, where)
    else:
        theta, local_theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0)), None
        scaling = _rope_scaling(hf, where)
    eos = hf.get("eos_token_id")
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 8192),
        n_layer=n,
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim", 256),
        intermediate_size=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        mlp="geglu",
        attn_bias=hf.get("attention_bias", False),
        qk_norm=family == "gemma3",
        mlp_bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        sliding_window=window if window and layers else None,
        window_layers=layers if window and layers and len(layers) < n else None,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
    )


def _neox_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """GPT-NeoX (Pythia): GPT-2's LayerNorms and biases, RoPE on the first rotary_pct of each
    head, attention and MLP side by side (use_parallel_residual), exact GELU, untied head."""
    act = hf.get("hidden_act", "gelu")
    if act not in NEOX_ACTS:
        raise NanotuneError(
            f"{where}: hidden_act {act!r} is not supported (one of {', '.join(NEOX_ACTS)})"
        )
    eos = hf.get("eos_token_id")
    return ModelConfig(
        family="gpt_neox",
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        positions="rope",
        rope_theta=hf.get("rotary_emb_base", _rope_parameters(hf).get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(hf, where),
        partial_rotary_factor=hf.get(
            "rotary_pct", _rope_parameters(hf).get("partial_rotary_factor", 0.25)
        ),
        mlp=NEOX_ACTS[act],
        attn_bias=hf.get("attention_bias", True),
        mlp_bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters` (rope_theta, partial_rotary_factor, scaling), or {}."""
    params = hf.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def _partial_rotary(hf: dict[str, Any]) -> float:
    """Phi-3's partial_rotary_factor (Phi-4-mini: 0.75), top level or in rope_parameters."""
    return hf.get("partial_rotary_factor") or _rope_parameters(hf).get("partial_rotary_factor", 1.0)


def _longrope_scaling(hf: dict[str, Any], where: str) -> dict[str, Any] | None:
    """Phi-3's rope_scaling: none, or su/longrope (yarn too, which transformers' Phi-3 reads as
    longrope) with short and long factors; its original context is the top-level
    original_max_position_embeddings where there is one (transformers gives it priority)."""
    scaling = _rope_scaling(hf, where)
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("su", "longrope", "yarn"):
        raise NanotuneError(
            f"{where}: Phi-3 rope_scaling type {kind!r} is not supported (longrope, su)"
        )
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "partial_rotary_factor")}
    scaling["rope_type"] = "longrope"
    original = hf.get("original_max_position_embeddings")
    if original is None:
        original = scaling.get("original_max_position_embeddings", hf["max_position_embeddings"])
    scaling["original_max_position_embeddings"] = original
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    half = int(head_dim * _partial_rotary(hf)) // 2
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or len(factors) != half:
            raise NanotuneError(
                f"{where}: rope_scaling.{key} must be a list of {half} numbers (half the rotary "
                f"dims), got {factors!r}; re-save the model (save_pretrained)"
            )
    return scaling


def _windows(hf: dict[str, Any], model_type: str, where: str) -> dict[str, Any]:
    """sliding_window and window_layers as transformers reads them for each family: Mistral's
    window applies to every layer; Qwen's and SmolLM3's only with use_sliding_window, and only
    on the layers `layer_types` (else max_window_layers, or SmolLM3's no-RoPE layers) names."""
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return {}
    if model_type not in ("mistral", "phi3") and not hf.get("use_sliding_window", False):
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise NanotuneError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if model_type in ("mistral", "phi3"):  # every layer slides
        layers = None
    elif types is not None:
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif model_type == "smollm3":
        layers = _nope_layers(hf)
    else:
        layers = tuple(range(hf.get("max_window_layers", 28), n))
    if layers is not None and len(layers) == n:
        layers = None
    return {"sliding_window": window, "window_layers": layers}


def _nope_layers(hf: dict[str, Any]) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE: `no_rope_layers` holds 1 where a layer uses RoPE."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % every != 0) for i in range(hf["num_hidden_layers"])]
    return tuple(i for i, uses in enumerate(flags) if not uses)


def _rope_scaling(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise NanotuneError(
            f"{where}: rope_scaling must be a mapping (e.g. {{rope_type: llama3, factor: 8}}) or "
            f"null, got {scaling!r}; re-save the model (save_pretrained)"
        )
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    return {k: v for k, v in scaling.items() if k != "rope_theta"}


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers' AutoConfig reads back to the same architecture."""
    if config.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.n_embd,
            "n_inner": config.intermediate_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "tie_word_embeddings": config.tie_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "torch_dtype": "float32",
        }
    if config.family in ("gemma2", "gemma3"):
        return _gemma_config_to_hf(config)
    if config.family == "gpt_neox":
        return _neox_config_to_hf(config)
    hf = {
        **_rope_decoder_fields(config),
        "model_type": config.family,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "mlp_bias": config.mlp_bias,
    }
    if config.rope_scaling:
        hf["rope_scaling"] = dict(config.rope_scaling)
    if config.family == "phi3":
        hf["partial_rotary_factor"] = config.partial_rotary_factor
        hf["sliding_window"] = config.sliding_window
        if config.rope_scaling:  # transformers' Phi-3 reads the original context at top level
            original = config.rope_scaling["original_max_position_embeddings"]
            hf["original_max_position_embeddings"] = original
        return hf
    if config.family == "smollm3":
        hf["no_rope_layers"] = [int(i not in config.nope_layers) for i in range(config.n_layer)]
    if config.family == "mistral":
        hf["sliding_window"] = config.sliding_window
    elif config.family != "llama":  # Qwen2, Qwen3, SmolLM3: a window only where layer_types say
        windowed = [config.window(i) is not None for i in range(config.n_layer)]
        hf["use_sliding_window"] = any(windowed)
        hf["sliding_window"] = config.sliding_window
        hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windowed]
    return hf


def _neox_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    hf = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn,
        "hidden_act": "gelu" if config.mlp == "gelu_exact" else "gelu_new",
        "layer_norm_eps": config.norm_eps,
        "rotary_pct": config.partial_rotary_factor,
        "rotary_emb_base": config.rope_theta,
        "use_parallel_residual": config.parallel_residual,
        "attention_bias": config.attn_bias,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "attention_dropout": config.dropout,
        "hidden_dropout": config.dropout,
        "torch_dtype": "float32",
    }
    if config.rope_scaling:
        hf["rope_scaling"] = dict(config.rope_scaling)
    return hf


def _rope_decoder_fields(config: ModelConfig) -> dict[str, Any]:
    """The config.json fields every RoPE family (Llama and its descendants, Gemma) writes alike."""
    return {
        "architectures": [f"{ARCHITECTURES[config.family]}ForCausalLM"],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "hidden_size": config.n_embd,
        "head_dim": config.hd,
        "intermediate_size": config.ffn,
        "rms_norm_eps": config.norm_eps,
        "attention_bias": config.attn_bias,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": None,  # SmolLM3's config defaults to an id of its own 128k vocabulary
        "attention_dropout": config.dropout,
        "torch_dtype": "float32",
    }


def _gemma_config_to_hf(config: ModelConfig) -> dict[str, Any]:
    windowed = [config.window(i) is not None for i in range(config.n_layer)]
    hf = {
        **_rope_decoder_fields(config),
        "model_type": "gemma2" if config.family == "gemma2" else "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.hd,
        "sliding_window": config.sliding_window,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in windowed],
        "attn_logit_softcapping": config.attn_softcap,
        "final_logit_softcapping": config.final_softcap,
    }
    global_ = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        global_ = {**dict(config.rope_scaling), "rope_theta": config.rope_theta}
    if config.family == "gemma2":
        hf["rope_parameters"] = global_
    else:
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta or config.rope_theta}
        hf["rope_parameters"] = {"full_attention": global_, "sliding_attention": local}
    return hf


def _strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def from_hf(
    sd: dict[str, Tensor], config: ModelConfig, where: str = "checkpoint"
) -> dict[str, Tensor]:
    """Hugging Face state dict (any of the usual prefixes) -> nanotune state dict.

    Every tensor must be used: one the config has no place for (a config.json naming fewer
    layers than the weights hold) is an error naming it, not silently dropped.
    """
    out: dict[str, Tensor] = {}
    if config.family == "gpt2":
        sd = _strip_prefix(sd, "transformer.")
        take, used = _taker(sd, where)
        out["wte.weight"] = take("wte.weight")
        out["wpe.weight"] = take("wpe.weight")
        for i in range(config.n_layer):
            p, q = f"h.{i}.", f"blocks.{i}."
            for hf_norm, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
                out[q + norm + ".weight"] = take(p + hf_norm + ".weight")
                out[q + norm + ".bias"] = take(p + hf_norm + ".bias")
            for hf_lin, lin in (
                ("attn.c_attn", "attn.qkv"),
                ("attn.c_proj", "attn.proj"),
                ("mlp.c_fc", "mlp.fc"),
                ("mlp.c_proj", "mlp.proj"),
            ):
                out[q + lin + ".weight"] = take(p + hf_lin + ".weight").t().contiguous()
                out[q + lin + ".bias"] = take(p + hf_lin + ".bias")
        out["norm.weight"] = take("ln_f.weight")
        out["norm.bias"] = take("ln_f.bias")
        out["lm_head.weight"] = (
            out["wte.weight"] if config.tie_embeddings else take("lm_head.weight")
        )
        return _all_used(out, sd, used, config, where)
    if config.family == "gpt_neox":
        return _neox_from_hf(sd, config, where)

    sd = _strip_prefix(sd, "model.")
    take, used = _taker(sd, where)
    out["wte.weight"] = take("embed_tokens.weight")
    for i in range(config.n_layer):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for norm, hf_norm in _block_norms(config).items():
            out[q + norm + ".weight"] = take(p + hf_norm + ".weight")
        a = p + "self_attn."
        if config.family == "phi3":  # fused as nanotune fuses them
            out[q + "attn.qkv.weight"] = take(a + "qkv_proj.weight")
        else:
            out[q + "attn.qkv.weight"] = torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"])
        out[q + "attn.proj.weight"] = take(a + "o_proj.weight")
        if config.has_qkv_bias:
            out[q + "attn.qkv.bias"] = torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"])
        if config.attn_bias:
            out[q + "attn.proj.bias"] = take(a + "o_proj.bias")
        if config.qk_norm:
            out[q + "attn.q_norm.weight"] = take(a + "q_norm.weight")
            out[q + "attn.k_norm.weight"] = take(a + "k_norm.weight")
        m = p + "mlp."
        if config.family == "phi3":
            out[q + "mlp.fc.weight"] = take(m + "gate_up_proj.weight")
        else:
            out[q + "mlp.fc.weight"] = torch.cat(
                [take(m + "gate_proj.weight"), take(m + "up_proj.weight")]
            )
        out[q + "mlp.proj.weight"] = take(m + "down_proj.weight")
        if config.mlp_bias:
            out[q + "mlp.fc.bias"] = torch.cat(
                [take(m + "gate_proj.bias"), take(m + "up_proj.bias")]
            )
            out[q + "mlp.proj.bias"] = take(m + "down_proj.bias")
    out["norm.weight"] = take("norm.weight")
    out["lm_head.weight"] = out["wte.weight"] if config.tie_embeddings else take("lm_head.weight")
    return _all_used(out, sd, used, config, where)


# GPT-NeoX's linears (after `layers.N.`) and where they live in nanotune.
NEOX_LINEARS = {
    "attention.query_key_value": "attn.qkv",
    "attention.dense": "attn.proj",
    "mlp.dense_h_to_4h": "mlp.fc",
    "mlp.dense_4h_to_h": "mlp.proj",
}
NEOX_HEAD = "embed_out.weight"  # what transformers writes (its module is named lm_head)


def _neox_from_hf(sd: dict[str, Tensor], config: ModelConfig, where: str) -> dict[str, Tensor]:
    sd = _strip_prefix(sd, "gpt_neox.")
    take, used = _taker(sd, where)
    out = {"wte.weight": take("embed_in.weight")}
    order = hf_row_order(config, "attn.qkv").argsort()
    for i in range(config.n_layer):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for norm, hf_norm in _block_norms(config).items():
            out[q + norm + ".weight"] = take(p + hf_norm + ".weight")
            out[q + norm + ".bias"] = take(p + hf_norm + ".bias")
        for hf_lin, lin in NEOX_LINEARS.items():
            kinds = ("weight", "bias") if config.attn_bias or lin.startswith("mlp") else ("weight",)
            for kind in kinds:
                w = take(f"{p}{hf_lin}.{kind}")
                out[f"{q}{lin}.{kind}"] = w[order] if lin == "attn.qkv" else w
    out["norm.weight"] = take("final_layer_norm.weight")
    out["norm.bias"] = take("final_layer_norm.bias")
    if config.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = take(NEOX_HEAD if NEOX_HEAD in sd else "lm_head.weight")
    return _all_used(out, sd, used, config, where)


def _block_norms(config: ModelConfig) -> dict[str, str]:
    """nanotune norm -> HF name, in one block of a Llama-like family."""
    if config.post_norms:
        return GEMMA_NORMS
    return {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}


def _taker(sd: dict[str, Tensor], where: str):
    """take(key) -> tensor, and the set of keys taken so far."""
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise NanotuneError(
                f"{where}: missing tensor {key!r}; is the file complete and of the architecture "
                "its config.json names?"
            )
        used.add(key)
        return sd[key]

    return take, used


SCORE = "score.weight"
"""The head of an HF sequence-classification folder (a nanotune reward model writes one)."""

# Buffers some checkpoints carry that the model rebuilds itself (causal masks, RoPE frequencies).
DERIVED = (
    "attn.bias",
    "attn.masked_bias",
    "attention.bias",
    "attention.masked_bias",
    "rotary_emb.inv_freq",
)


def _all_used(
    out: dict[str, Tensor], sd: dict[str, Tensor], used: set[str], config: ModelConfig, where: str
) -> dict[str, Tensor]:
    unused = sorted(
        k
        for k in set(sd) - used
        if not k.endswith(DERIVED)
        and not (k == "lm_head.weight" and config.tie_embeddings)
        and k != SCORE  # a sequence-classification head: the classifier loader's to read
    )
    if unused:
        shown = ", ".join(repr(k) for k in unused[:3]) + (", ..." if len(unused) > 3 else "")
        raise NanotuneError(
            f"{where}: {len(unused)} tensor(s) have no place in the {config.n_layer}-layer "
            f"{config.family} model its config describes, e.g. {shown}; the config does not "
            "match the weights (re-download or re-save the model)"
        )
    return out


def to_hf(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """nanotune state dict -> Hugging Face state dict (GPT2LMHeadModel / LlamaForCausalLM names;
    the Llama-derived families use Llama's)."""
    out: dict[str, Tensor] = {}
    if config.family == "gpt2":
        out["transformer.wte.weight"] = sd["wte.weight"]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(config.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for hf_norm, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
                out[p + hf_norm + ".weight"] = sd[q + norm + ".weight"]
                out[p + hf_norm + ".bias"] = sd[q + norm + ".bias"]
            for hf_lin, lin in (
                ("attn.c_attn", "attn.qkv"),
                ("attn.c_proj", "attn.proj"),
                ("mlp.c_fc", "mlp.fc"),
                ("mlp.c_proj", "mlp.proj"),
            ):
                out[p + hf_lin + ".weight"] = sd[q + lin + ".weight"].t().contiguous()
                out[p + hf_lin + ".bias"] = sd[q + lin + ".bias"]
        out["transformer.ln_f.weight"] = sd["norm.weight"]
        out["transformer.ln_f.bias"] = sd["norm.bias"]
        if not config.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    if config.family == "gpt_neox":
        return _neox_to_hf(sd, config)

    out["model.embed_tokens.weight"] = sd["wte.weight"]
    qkv = [s[1] - s[0] for s in config.qkv_slices.values()]
    for i in range(config.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        for norm, hf_norm in _block_norms(config).items():
            out[p + hf_norm + ".weight"] = sd[q + norm + ".weight"]
        if config.family == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = sd[q + "attn.qkv.weight"]
        else:
            for name, w in zip("qkv", sd[q + "attn.qkv.weight"].split(qkv), strict=True):
                out[p + f"self_attn.{name}_proj.weight"] = w.contiguous()
        out[p + "self_attn.o_proj.weight"] = sd[q + "attn.proj.weight"]
        if config.has_qkv_bias:
            for name, b in zip("qkv", sd[q + "attn.qkv.bias"].split(qkv), strict=True):
                out[p + f"self_attn.{name}_proj.bias"] = b.contiguous()
        if config.attn_bias:
            out[p + "self_attn.o_proj.bias"] = sd[q + "attn.proj.bias"]
        if config.qk_norm:
            out[p + "self_attn.q_norm.weight"] = sd[q + "attn.q_norm.weight"]
            out[p + "self_attn.k_norm.weight"] = sd[q + "attn.k_norm.weight"]
        if config.family == "phi3":
            out[p + "mlp.gate_up_proj.weight"] = sd[q + "mlp.fc.weight"]
        else:
            gate, up = sd[q + "mlp.fc.weight"].chunk(2)
            out[p + "mlp.gate_proj.weight"] = gate.contiguous()
            out[p + "mlp.up_proj.weight"] = up.contiguous()
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.proj.weight"]
        if config.mlp_bias:
            gb, ub = sd[q + "mlp.fc.bias"].chunk(2)
            out[p + "mlp.gate_proj.bias"] = gb.contiguous()
            out[p + "mlp.up_proj.bias"] = ub.contiguous()
            out[p + "mlp.down_proj.bias"] = sd[q + "mlp.proj.bias"]
    out["model.norm.weight"] = sd["norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _neox_to_hf(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    out = {"gpt_neox.embed_in.weight": sd["wte.weight"]}
    order = hf_row_order(config, "attn.qkv")
    for i in range(config.n_layer):
        p, q = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        for norm, hf_norm in _block_norms(config).items():
            out[p + hf_norm + ".weight"] = sd[q + norm + ".weight"]
            out[p + hf_norm + ".bias"] = sd[q + norm + ".bias"]
        for hf_lin, lin in NEOX_LINEARS.items():
            for kind in ("weight", "bias"):
                w = sd.get(f"{q}{lin}.{kind}")
                if w is not None:
                    out[f"{p}{hf_lin}.{kind}"] = w[order] if lin == "attn.qkv" else w
    out["gpt_neox.final_layer_norm.weight"] = sd["norm.weight"]
    out["gpt_neox.final_layer_norm.bias"] = sd["norm.bias"]
    if not config.tie_embeddings:
        out[NEOX_HEAD] = sd["lm_head.weight"]
    return out

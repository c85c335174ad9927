"""llama.cpp GGUF files (architectures `llama`, `qwen2`, `qwen3`, `smollm3`, `gemma2`, `gemma3`,
`phi3`, `gptneox` and `gpt2`), of any type gguf's numpy quants read (K-quants included): dequantized
into a float Transformer, and the vocabulary they carry (the one reader of the file; the tokenizer
gets its metadata decoded).

Tensors are renamed to Hugging Face names and handed to `convert.from_hf`, as a safetensors
checkpoint would be: llama.cpp keeps Llama's (and SmolLM3's) Q/K rows in its interleaved rotary
order (undone here; Qwen's rotate halves, as Hugging Face does) and GPT-2's Conv1D weights as
[out, in] (transposed back to Conv1D's [in, out] here); Gemma's norm weights with llama.cpp's
+1 folded in (taken off here: Hugging Face and nanotune hold them zero-centred); GPT-NeoX's fused
qkv as [q, k, v] (convert_hf_to_gguf undoes its per-head interleaving; redone here); Phi-3's
longrope factors as the tensors rope_factors_long/short (read into the config).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, LlamaFileType
from gguf.quants import dequantize
from torch import Tensor

from nanotune.errors import NanotuneError
from nanotune.files.read import check_finite
from nanotune.models.config import ModelConfig
from nanotune.models.names import hf_row_order
from nanotune.models.transformer import Transformer
from nanotune.tokenizer import GGUF_KEYS, Tokenizer
from nanotune.weights import convert
from nanotune.weights.build import build_model

# llama.cpp tensor names (after `blk.N.`) -> Hugging Face Llama names (after `model.layers.N.`).
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
LLAMA_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# The same for GPT-2 (after `transformer.h.N.`), as convert_hf_to_gguf maps GPT2LMHeadModel.
GPT2_BLOCK_NAMES = {
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
    "attn_norm": "ln_1",
    "ffn_norm": "ln_2",
}
GPT2_TOP_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
QWEN3_BLOCK_NAMES = LLAMA_BLOCK_NAMES | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
GEMMA2_BLOCK_NAMES = {
    **{k: v for k, v in LLAMA_BLOCK_NAMES.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GEMMA3_BLOCK_NAMES = GEMMA2_BLOCK_NAMES | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
PHI3_BLOCK_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",  # gate and up fused, as Phi-3 and nanotune hold them
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
NEOX_BLOCK_NAMES = {
    "attn_qkv": "attention.query_key_value",
    "attn_output": "attention.dense",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
NEOX_TOP_NAMES = {
    "token_embd": "gpt_neox.embed_in",
    "output_norm": "gpt_neox.final_layer_norm",
    "output": "embed_out",
}
# Phi-3's longrope factors: model tensors in GGUF, config in Hugging Face.
ROPE_FACTORS = {
    "long_factor": "rope_factors_long.weight",
    "short_factor": "rope_factors_short.weight",
}
# Per nanotune family: (HF block prefix, block names, top-level names).
GGUF_NAMES = {
    "llama": ("model.layers.", LLAMA_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "mistral": ("model.layers.", LLAMA_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "qwen2": ("model.layers.", LLAMA_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "qwen3": ("model.layers.", QWEN3_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "smollm3": ("model.layers.", LLAMA_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "gemma2": ("model.layers.", GEMMA2_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "gemma3": ("model.layers.", GEMMA3_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "phi3": ("model.layers.", PHI3_BLOCK_NAMES, LLAMA_TOP_NAMES),
    "gpt_neox": ("gpt_neox.layers.", NEOX_BLOCK_NAMES, NEOX_TOP_NAMES),
    "gpt2": ("transformer.h.", GPT2_BLOCK_NAMES, GPT2_TOP_NAMES),
}
# The llama.cpp architecture of each family: Mistral is a Llama to llama.cpp (convert_hf_to_gguf
# writes it so), its sliding window a metadata key; read back, a Llama with a window is Mistral.
GGUF_ARCH = {family: family for family in GGUF_NAMES} | {"mistral": "llama", "gpt_neox": "gptneox"}
# Architectures whose Q/K rows llama.cpp keeps in its interleaved rotary order (rope type NORM);
# the others (NEOX) rotate halves, as Hugging Face does, and are stored as they are.
PERMUTED_QK = ("llama", "smollm3")
SMOLLM3_NOPE_EVERY = 4  # llama.cpp's SmolLM3 skips RoPE on every 4th layer (no GGUF key for it)
# What llama.cpp fixes for Gemma (no GGUF key): every n-th layer is global, the others slide;
# Gemma 3's sliding layers rotate with base 10000; queries are scaled by 1/sqrt(head dim).
GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_THETA = 10_000.0
GEMMA_NORM_SHIFT = 1.0  # llama.cpp's Gemma norms multiply by w, Hugging Face's by (1 + w)


def gemma_window_layers(family: str, n_layer: int) -> tuple[int, ...]:
    every = GEMMA_GLOBAL_EVERY[family]
    return tuple(i for i in range(n_layer) if (i + 1) % every)


WRITER_KEY = "nanotune.version"
"""Metadata every GGUF nanotune writes carries (its version; llama.cpp ignores keys it does not
know): `--overwrite` replaces a GGUF file only when it has this key."""


def written_by_nanotune(path: str | Path) -> bool:
    """Whether the file at `path` is a GGUF that nanotune wrote (reads its header only)."""
    try:
        return WRITER_KEY in open_gguf(path).fields
    except NanotuneError:  # not a GGUF at all
        return False


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path).expanduser()
    try:
        return GGUFReader(path)
    except FileNotFoundError:
        raise NanotuneError(f"GGUF file {path} does not exist") from None
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad bytes
        raise NanotuneError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it"
        ) from None


def gguf_facts(path: str | Path) -> dict[str, Any]:
    """What a model card says of a GGUF file: its name, architecture, weight type (llama.cpp's
    file type, e.g. Q4_K_M), context length, base model and the nanotune that wrote it."""
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    file_type = _field(reader, "general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = None if file_type is None else str(file_type)
    return {
        "name": _field(reader, "general.name"),
        "architecture": arch,
        "quant": quant,
        "context_length": _field(reader, f"{arch}.context_length"),
        "base_model": _field(reader, "general.base_model.0.name"),
        "nanotune": _field(reader, WRITER_KEY),
    }


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: GGUFReader, where: str) -> ModelConfig:
    """ModelConfig from a GGUF's `{arch}.*` metadata; untied when an `output.weight` exists."""
    arch = _field(reader, "general.architecture")
    archs = sorted(set(GGUF_ARCH.values()))
    if arch not in archs:
        raise NanotuneError(
            f"{where}: GGUF architecture {arch!r} is not supported (one of {', '.join(archs)})"
        )
    if _field(reader, "general.type") == "adapter":
        raise NanotuneError(
            f"{where}: is a GGUF LoRA adapter, not a model; load its base model, or the PEFT "
            "adapter folder it was exported from (--adapter)"
        )
    names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise NanotuneError(f"{where}: GGUF metadata '{arch}.{key}' is missing; re-convert it")
        return value

    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise NanotuneError(f"{where}: GGUF has no 'token_embd.weight' tensor; re-convert it")
    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    common = dict(
        vocab_size=int(embd.shape[1]),  # ggml shapes are [n_embd, n_vocab]
        block_size=need("context_length"),
        n_layer=need("block_count"),
        n_head=n_head,
        n_embd=n_embd,
        tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    if arch == "gpt2":
        if _field(reader, "gpt2.attention.head_count_kv", n_head) != n_head:
            raise NanotuneError(f"{where}: a gpt2 GGUF with grouped-query attention; re-convert it")
        ffn = need("feed_forward_length")
        return ModelConfig(
            family="gpt2",
            **common,
            intermediate_size=None if ffn == 4 * n_embd else ffn,  # as config.json's n_inner
            norm="layernorm",
            norm_eps=float(_field(reader, "gpt2.attention.layer_norm_epsilon", 1e-5)),
            positions="learned",
            mlp="gelu",
            attn_bias=True,
            mlp_bias=True,
        )
    if arch == "gptneox":
        return _neox_config(reader, common, need)
    if "rope_freqs.weight" in names:
        raise NanotuneError(
            f"{where}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported "
            "in GGUF; load the model's Hugging Face folder instead"
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise NanotuneError(
            f"{where}: GGUF RoPE scaling {scaling!r} is not supported (none or linear); "
            "load the model's Hugging Face folder instead"
        )
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": need("rope.scaling.factor")}
    if arch in GEMMA_GLOBAL_EVERY:
        return _gemma_config(reader, arch, common, need)
    window = _field(reader, f"{arch}.attention.sliding_window")
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    window_layers = None
    if window and isinstance(pattern, list):  # per layer: True where it slides
        window_layers = tuple(i for i, slides in enumerate(pattern) if slides)
    n_layer = common["n_layer"]
    hd = _field(reader, f"{arch}.attention.key_length", n_embd // n_head)
    if arch == "phi3":
        rope_scaling = _longrope(reader, arch, common["block_size"])
    return ModelConfig(
        family="mistral" if arch == "llama" and window else arch,
        **common,
        n_kv_head=_field(reader, f"{arch}.attention.head_count_kv", n_head),
        head_dim=hd,
        intermediate_size=need("feed_forward_length"),
        norm="rmsnorm",
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        positions="rope",
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        partial_rotary_factor=_partial(_field(reader, f"{arch}.rope.dimension_count", hd), hd),
        mlp="swiglu",
        attn_bias="blk.0.attn_output.bias" in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        mlp_bias=False,
        sliding_window=window or None,
        window_layers=window_layers,
        nope_layers=(
            tuple(range(SMOLLM3_NOPE_EVERY - 1, n_layer, SMOLLM3_NOPE_EVERY))
            if arch == "smollm3"
            else ()
        ),
    )


def _partial(rotary: int, hd: int) -> float:
    """The partial_rotary_factor whose int(hd * factor) is `rotary` (a float division may land
    just below it)."""
    factor = rotary / hd
    return factor if int(hd * factor) == rotary else math.nextafter(factor, math.inf)


def _longrope(reader: GGUFReader, arch: str, context: int) -> dict[str, Any] | None:
    """Phi-3's longrope scaling from its factor tensors and metadata, or None without them."""
    tensors = {t.name: t for t in reader.tensors}
    if not all(name in tensors for name in ROPE_FACTORS.values()):
        return None
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for key, name in ROPE_FACTORS.items():
        scaling[key] = [float(x) for x in np.asarray(tensors[name].data, dtype=np.float64)]
    scaling["original_max_position_embeddings"] = int(
        _field(reader, f"{arch}.rope.scaling.original_context_length", context)
    )
    attention = _field(reader, f"{arch}.rope.scaling.attn_factor")
    if attention is not None:
        scaling["attention_factor"] = float(attention)
    return scaling


def _neox_config(reader: GGUFReader, common: dict, need) -> ModelConfig:
    """GPT-NeoX as llama.cpp's gptneox runs it; its GELU is read as the exact one of
    Hugging Face's GPT-NeoX (llama.cpp computes the tanh one)."""
    names = {t.name for t in reader.tensors}
    hd = common["n_embd"] // common["n_head"]
    return ModelConfig(
        family="gpt_neox",
        **common,
        intermediate_size=need("feed_forward_length"),
        norm="layernorm",
        norm_eps=float(_field(reader, "gptneox.attention.layer_norm_epsilon", 1e-5)),
        positions="rope",
        rope_theta=float(_field(reader, "gptneox.rope.freq_base", 10000.0)),
        partial_rotary_factor=_partial(_field(reader, "gptneox.rope.dimension_count", hd), hd),
        mlp="gelu_exact",
        attn_bias="blk.0.attn_qkv.bias" in names,
        mlp_bias=True,
        parallel_residual=bool(_field(reader, "gptneox.use_parallel_residual", True)),
    )


def _gemma_config(reader: GGUFReader, arch: str, common: dict, need) -> ModelConfig:
    """Gemma 2 / 3 as llama.cpp runs them (see GEMMA_GLOBAL_EVERY)."""
    n_embd, n_head, n_layer = common["n_embd"], common["n_head"], common["n_layer"]
    hd = _field(reader, f"{arch}.attention.key_length", n_embd // n_head)
    window = _field(reader, f"{arch}.attention.sliding_window")
    layers = gemma_window_layers(arch, n_layer)
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": need("rope.scaling.factor")}
    return ModelConfig(
        family=arch,
        **common,
        n_kv_head=_field(reader, f"{arch}.attention.head_count_kv", n_head),
        head_dim=hd,
        intermediate_size=need("feed_forward_length"),
        norm="rmsnorm",
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        positions="rope",
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_local_theta=GEMMA3_LOCAL_THETA if arch == "gemma3" else None,
        mlp="geglu",
        attn_bias=False,
        qk_norm=arch == "gemma3",
        mlp_bias=False,
        sliding_window=window or None,
        window_layers=layers if window and len(layers) < n_layer else None,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=hd,
        attn_softcap=_field(reader, f"{arch}.attn_logit_softcapping"),
        final_softcap=_field(reader, f"{arch}.final_logit_softcapping"),
    )


def _hf_name(name: str, family: str = "llama") -> str | None:
    prefix, blocks, top = GGUF_NAMES[family]
    stem, _, kind = name.rpartition(".")  # kind: weight or bias
    if stem.startswith("blk."):
        _, layer, part = (stem.split(".", 2) + ["", ""])[:3]
        hf = blocks.get(part)
        return f"{prefix}{layer}.{hf}.{kind}" if hf and layer.isdigit() else None
    hf = top.get(stem)
    return f"{hf}.{kind}" if hf else None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: it interleaves each head's two rotary halves
    (convert_hf_to_gguf `permute`); Hugging Face keeps them as halves (rotate_half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_CONV1D_WEIGHTS = tuple(f"{module}.weight" for module in convert.GPT2_CONV1D)


def read_gguf_state_dict(reader: GGUFReader, config: ModelConfig, where: str) -> dict[str, Tensor]:
    """Dequantized tensors with Hugging Face names (Llama's or GPT-2's), tensor by tensor."""
    sd: dict[str, Tensor] = {}
    permuted = GGUF_ARCH[config.family] in PERMUTED_QK
    neox = hf_row_order(config, "attn.qkv")
    for t in reader.tensors:
        if t.name in ROPE_FACTORS.values():  # read into the config
            continue
        name = _hf_name(t.name, config.family)
        if name is None:
            raise NanotuneError(f"{where}: unexpected tensor {t.name!r} for a {config.family} GGUF")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise NanotuneError(
                f"{where}: tensor {t.name!r} uses GGUF type {t.tensor_type.name}, which the gguf "
                "package cannot dequantize; use a file of the types it reads (F32, F16, BF16, "
                "Q4_0 to Q8_0, the K-quants Q2_K to Q6_K, the IQ types)"
            ) from None
        if config.family == "gpt2":
            if name.endswith(_CONV1D_WEIGHTS):
                w = w.T
        elif permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, config.n_head)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, config.kv_heads)
        elif config.norm_plus_one and name.endswith("norm.weight"):
            w = w - GEMMA_NORM_SHIFT
        elif neox is not None and ".query_key_value." in name:
            w = w[neox.numpy()]  # [q, k, v] back to GPT-NeoX's per-head interleaving
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:  # F32 tensors come back as views of the read-only file map
            w = w.copy()
        sd[name] = torch.from_numpy(w)
        check_finite({t.name: sd[name]}, where)
    return sd


def gguf_tokenizer(reader: GGUFReader, where: str) -> Tokenizer:
    """The tokenizer of an open GGUF, from its `tokenizer.*` metadata decoded to plain values."""
    fields = {key: _field(reader, key) for key in GGUF_KEYS if key in reader.fields}
    return Tokenizer.from_gguf_metadata(fields, where)


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of the GGUF file at `path` (`load_model` gives model and tokenizer at once)."""
    path = Path(path).expanduser()
    return gguf_tokenizer(open_gguf(path), str(path))


def load_gguf_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    reader: GGUFReader | None = None,
) -> Transformer:
    """A float Transformer from a GGUF file of a supported architecture (quantized tensors are
    dequantized).

    `reader`: the file already open (parsing its metadata takes seconds), e.g. shared with the
    tokenizer.
    """
    reader = reader or open_gguf(path)
    where = str(path)
    config = config_from_gguf(reader, where)
    sd = convert.from_hf(read_gguf_state_dict(reader, config, where), config, where=where)
    return build_model(config, sd, dtype=dtype, device=device, where=where)

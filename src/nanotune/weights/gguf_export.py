"""llama.cpp GGUF files out (Llama architecture): a float Transformer and its tokenizer as one
.gguf that llama.cpp and Ollama run, and that `weights.gguf` reads back to the same model.

The layout is the inverse of the reader's: its name maps reversed, Q/K rows permuted back to
llama.cpp's rotary order, the metadata it reads under the keys it reads them from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_file, check_file_target, clean_leftovers
from nanotune.models.transformer import Transformer
from nanotune.tokenizer import Tokenizer
from nanotune.weights import convert
from nanotune.weights.gguf import BLOCK_NAMES, TOP_NAMES

# --quant: the type of the 2-D weights, and the file type llama.cpp records for it.
QUANTS = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
Q8_BLOCK = 32  # values per Q8_0 block: a quantized row's length must be a multiple of it

_TO_GGUF_BLOCK = {hf: gguf for gguf, hf in BLOCK_NAMES.items()}
_TO_GGUF_TOP = {hf: gguf for gguf, hf in TOP_NAMES.items()}


def _gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        layer, part = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{_TO_GGUF_BLOCK[part]}.{kind}"
    return f"{_TO_GGUF_TOP[stem]}.{kind}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face Q/K rows (each head's rotary halves apart) to llama.cpp's interleaved order:
    convert_hf_to_gguf's `permute`, the inverse of `weights.gguf._unpermute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(w: np.ndarray, quant: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type one tensor is stored as, chosen as llama.cpp's converter chooses it: norms, biases
    and every other 1-D tensor stay F32 (tiny, and precision-critical); a matrix whose rows are
    not a whole number of Q8_0 blocks falls back to F16 instead of being refused."""
    if w.ndim == 1:
        return GGMLQuantizationType.F32
    if quant == GGMLQuantizationType.Q8_0 and w.shape[-1] % Q8_BLOCK:
        return GGMLQuantizationType.F16
    return quant


def _check_exportable(model: Transformer, where: str) -> None:
    config = model.config
    if config.family != "llama":
        raise NanotuneError(
            f"{where}: a {config.family} model; GGUF export writes Llama-architecture models only "
            "for now; export it as an HF folder (--format hf) and convert that with llama.cpp"
        )
    if config.mlp_bias:
        raise NanotuneError(f"{where}: MLP biases have no place in a llama GGUF; use --format hf")
    scaling = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if scaling not in (None, "linear"):
        raise NanotuneError(
            f"{where}: RoPE scaling {scaling!r} cannot be written to GGUF (none or linear); "
            "use --format hf"
        )
    with torch.device("meta"):
        plain = set(Transformer(config).state_dict())
    extra = sorted(set(model.state_dict()) - plain)
    if extra:
        raise NanotuneError(
            f"{where}: the model has weights outside the base architecture (e.g. {extra[0]!r}); "
            "merge its adapters first"
        )


def _write_metadata(writer: GGUFWriter, model: Transformer, tokenizer: Tokenizer, name: str):
    c = model.config
    writer.add_name(name)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.hd)
    if c.hd != c.n_embd // c.n_head:
        writer.add_key_length(c.hd)
        writer.add_value_length(c.hd)
    writer.add_rope_freq_base(float(c.rope_theta))
    if c.rope_scaling:
        writer.add_string("llama.rope.scaling.type", "linear")
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    writer.add_vocab_size(c.vocab_size)
    for key, value in tokenizer.gguf_metadata(c.vocab_size).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    *,
    quant: str = "f16",
    name: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write `model` (a plain Llama Transformer: merge adapters first) and `tokenizer` to the
    GGUF file `path`, atomically. `quant`: f32, f16 or q8_0 for the matrices (see
    `_tensor_type`); `name` goes in general.name (default: the file's stem). An existing `path`
    is refused unless `overwrite`, and never replaced when it is one of `inputs`."""
    path = Path(path).expanduser()
    if quant not in QUANTS:
        raise NanotuneError(f"GGUF quant {quant!r} is not supported; choose {', '.join(QUANTS)}")
    check_file_target(path, overwrite=overwrite, inputs=inputs)
    _check_exportable(model, str(path))
    qtype, file_type = QUANTS[quant]
    config = model.config
    hf_sd = convert.to_hf(model.state_dict(), config)
    clean_leftovers(path)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, "llama")
        _write_metadata(writer, model, tokenizer, name or path.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for hf_name, tensor in hf_sd.items():
            w = tensor.detach().to("cpu", torch.float32).numpy()
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _permute(w, config.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _permute(w, config.kv_heads)
            kind = _tensor_type(w, qtype)
            data = quantize(np.ascontiguousarray(w), kind)
            writer.add_tensor(_gguf_name(hf_name), data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path

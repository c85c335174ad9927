"""llama.cpp GGUF files out (architectures `llama`, `qwen2`, `qwen3`, `smollm3`, `gemma2`, `gemma3`,
`phi3`, `gptneox` and `gpt2`; Mistral as `llama`): a float Transformer and its tokenizer as one
.gguf that llama.cpp and Ollama run, and that `weights.gguf` reads back to the same model.

The layout is the inverse of the reader's, as llama.cpp's convert_hf_to_gguf writes it: its name
maps reversed, Llama's (and SmolLM3's) Q/K rows permuted back to llama.cpp's rotary order, GPT-2's
Conv1D weights transposed to [out, in], Gemma's norm weights shifted by +1 (llama.cpp multiplies
by w where Hugging Face multiplies by 1 + w), GPT-NeoX's per-head fused qkv as [q, k, v], Phi-3's
longrope factors as tensors, the metadata under the keys llama.cpp reads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
)
from gguf.quants import quantize
from torch import Tensor

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_file, check_file_target, clean_leftovers, scratch_file
from nanotune.models.config import ModelConfig
from nanotune.models.names import hf_row_order
from nanotune.models.transformer import Transformer, longrope
from nanotune.tokenizer import Tokenizer
from nanotune.version import __version__
from nanotune.weights import convert
from nanotune.weights.gguf import (
    GEMMA3_LOCAL_THETA,
    GEMMA_GLOBAL_EVERY,
    GEMMA_NORM_SHIFT,
    GGUF_ARCH,
    GGUF_NAMES,
    PERMUTED_QK,
    ROPE_FACTORS,
    SMOLLM3_NOPE_EVERY,
    WRITER_KEY,
    gemma_window_layers,
    written_by_nanotune,
)
from nanotune.weights.resolve import HUB_ID

T = GGMLQuantizationType
# --quant: the type of the 2-D weights, and the file type llama.cpp records for it.
QUANTS = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_k_s": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
# The gguf package cannot write K-quants: llama.cpp's own quantizer (llama-cpp-python, the
# `llama` extra) makes these from an f32 GGUF, choosing each tensor's type itself.
K_QUANTS = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
FLOATS = (T.F32, T.F16, T.BF16)

_CONV1D_WEIGHTS = tuple(f"{module}.weight" for module in convert.GPT2_CONV1D)


def gguf_name(hf_name: str, family: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`
    -> `blk.3.attn_q.weight`) of a model of `family`."""
    prefix, blocks, top = GGUF_NAMES[family]
    stem, _, kind = hf_name.rpartition(".")
    if stem.startswith(prefix):
        layer, part = stem.removeprefix(prefix).split(".", 1)
        return f"blk.{layer}.{_inverse(blocks)[part]}.{kind}"
    return f"{_inverse(top)[stem]}.{kind}"


def _inverse(names: dict[str, str]) -> dict[str, str]:
    return {hf: gguf for gguf, hf in names.items()}


def permute(w: Tensor, n_heads: int) -> Tensor:
    """Hugging Face Q/K rows (each head's rotary halves apart) to llama.cpp's interleaved order:
    convert_hf_to_gguf's `permute`, the inverse of `weights.gguf._unpermute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(hf_name: str, w: Tensor, config: ModelConfig) -> Tensor:
    """One Hugging Face tensor in llama.cpp's layout (row order and orientation)."""
    if config.family == "gpt2":
        return w.T if hf_name.endswith(_CONV1D_WEIGHTS) else w
    if config.family == "gpt_neox":
        if ".query_key_value." in hf_name:  # per-head interleaved to [q, k, v]
            return w[hf_row_order(config, "attn.qkv").argsort().to(w.device)]
        return w
    if config.norm_plus_one and hf_name.endswith("norm.weight"):
        return w + GEMMA_NORM_SHIFT
    if GGUF_ARCH[config.family] not in PERMUTED_QK:
        return w
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute(w, config.n_head)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute(w, config.kv_heads)
    return w


def _tensor_type(
    name: str, shape: tuple[int, ...], quant: GGMLQuantizationType, *, head: bool, where: str
) -> GGMLQuantizationType:
    """The type one tensor is stored as, chosen as llama.cpp chooses it.

    Always F32: 1-D tensors (norms, biases: tiny and precision-critical) and GPT-2's position
    embedding (both convert_hf_to_gguf and llama-quantize keep it float). Q8_0 is a type of the
    converter, which keeps a matrix whose rows are not whole 32-value blocks at F16. Q4_0/Q4_1 are
    types of llama-quantize, which gives the output head (`head`: output.weight, or a tied
    token_embd) more bits, Q6_K — the gguf package cannot write Q6_K, so it gets the wider Q8_0,
    llama-quantize's own choice when Q6_K does not fit — and refuses a tensor whose rows are not
    whole blocks ("Unsupported tensor size encountered"): so does this, naming the tensor.
    """
    if len(shape) == 1 or name.startswith("position_embd."):
        return T.F32
    if quant in FLOATS:
        return quant
    row = shape[-1]
    if quant == T.Q8_0:
        return quant if row % GGML_QUANT_SIZES[quant][0] == 0 else T.F16
    kind = T.Q8_0 if head else quant
    block = GGML_QUANT_SIZES[kind][0]
    if row % block:
        raise NanotuneError(
            f"{where}: tensor {name!r} has rows of {row} values, not a multiple of {kind.name}'s "
            f"{block}-value blocks, so it cannot be {quant.name.lower()} (llama.cpp's quantizer "
            "refuses it too); use --quant q8_0 (which keeps such tensors at f16) or f16"
        )
    return kind


def check_quant(quant: str) -> None:
    """Refuse an unknown `quant`, or a K-quant without llama.cpp's quantizer installed (cheap:
    callers check before loading a model)."""
    if quant not in QUANTS:
        raise NanotuneError(f"GGUF quant {quant!r}: choose from {', '.join(QUANTS)}")
    if quant in K_QUANTS:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise NanotuneError(
                f"GGUF quant {quant!r} is made by llama.cpp's quantizer, which is not installed: "
                "pip install 'nanotune[llama]' (or choose q8_0, q4_0 or q4_1)"
            ) from e


def _llama_quantize(src: Path, dst: Path, file_type: LlamaFileType, where: str) -> None:
    """llama.cpp's llama-quantize, in process: the f32 GGUF `src` to `dst` as `file_type`
    (metadata copied, general.file_type set; a tensor whose rows are not whole 256-value
    super-blocks falls back to a 32-value type such as q5_0 or q8_0, as llama-quantize does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    # llama.cpp writes a line per tensor, to stderr and through llama-cpp-python's log callback
    # (Python's sys.stderr): keep them for the error, and the terminal quiet.
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stderr(log):
                failed = llama_cpp.llama_model_quantize(
                    str(src).encode(), str(dst).encode(), params
                )
        finally:
            log.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = log.read().splitlines()
    if failed:
        cause = next((x.strip() for x in reversed(lines) if x.strip()), "no message")
        raise NanotuneError(
            f"{where}: llama.cpp's quantizer failed to write {file_type.name} ({cause}); "
            "try --quant q8_0 or f16"
        )
    if not written_by_nanotune(dst):  # --overwrite finds nanotune's files by this key
        raise NanotuneError(f"{where}: llama.cpp's quantizer dropped the {WRITER_KEY} key")


def check_exportable(model: Transformer, where: str) -> None:
    config = model.config
    if config.family not in GGUF_NAMES:
        raise NanotuneError(
            f"{where}: a {config.family} model; GGUF export writes the families "
            f"{', '.join(GGUF_NAMES)}; export it as an HF folder (--format hf) instead"
        )
    arch = GGUF_ARCH[config.family]
    if config.family not in ("gpt2", "gpt_neox") and config.mlp_bias:
        raise NanotuneError(f"{where}: MLP biases have no place in a {arch} GGUF; use --format hf")
    every = SMOLLM3_NOPE_EVERY
    if arch == "smollm3" and config.nope_layers != tuple(range(every - 1, config.n_layer, every)):
        raise NanotuneError(
            f"{where}: llama.cpp's smollm3 skips RoPE on every {every}th layer, this model on "
            f"layers {list(config.nope_layers)}; use --format hf"
        )
    if arch in GEMMA_GLOBAL_EVERY:
        _check_gemma(config, arch, where)
    scaling = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    phi3_longrope = arch == "phi3" and longrope(config) is not None
    if scaling not in (None, "linear") and not phi3_longrope:
        raise NanotuneError(
            f"{where}: RoPE scaling {scaling!r} cannot be written to GGUF (none or linear; "
            "longrope for phi3); use --format hf"
        )
    if config.partial_rotary_factor != 1.0 and arch not in ("phi3", "gptneox"):
        raise NanotuneError(
            f"{where}: partial rotary dims have no GGUF key for {arch}; use --format hf"
        )
    with torch.device("meta"):
        plain = set(Transformer(config).state_dict())
    extra = sorted(set(model.state_dict()) - plain)
    if extra:
        raise NanotuneError(
            f"{where}: the model has weights outside the base architecture (e.g. {extra[0]!r}); "
            "merge its adapters first"
        )


def _check_gemma(config: ModelConfig, arch: str, where: str) -> None:
    """What llama.cpp fixes for Gemma (see `weights.gguf.GEMMA_GLOBAL_EVERY`) must hold."""
    layers = gemma_window_layers(arch, config.n_layer)
    windows = [config.window(i) is not None for i in range(config.n_layer)]
    if config.sliding_window is not None and windows != [
        i in layers for i in range(config.n_layer)
    ]:
        raise NanotuneError(
            f"{where}: llama.cpp's {arch} slides on all layers but every "
            f"{GEMMA_GLOBAL_EVERY[arch]}th, this model on layers "
            f"{[i for i, w in enumerate(windows) if w]}; use --format hf"
        )
    if config.query_pre_attn_scalar not in (None, config.hd):
        raise NanotuneError(
            f"{where}: llama.cpp's {arch} scales queries by 1/sqrt(head dim {config.hd}), "
            f"this model by 1/sqrt({config.query_pre_attn_scalar}); use --format hf"
        )
    if arch == "gemma3" and config.rope_local_theta != GEMMA3_LOCAL_THETA:
        raise NanotuneError(
            f"{where}: llama.cpp's gemma3 rotates its sliding layers with base "
            f"{GEMMA3_LOCAL_THETA:g}, this model with {config.rope_local_theta}; use --format hf"
        )


def _write_metadata(writer: GGUFWriter, model: Transformer, tokenizer: Tokenizer, name: str):
    c = model.config
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn)
    writer.add_head_count(c.n_head)
    writer.add_vocab_size(c.vocab_size)
    if c.family == "gpt2":
        writer.add_layer_norm_eps(float(c.norm_eps))
    elif c.family == "gpt_neox":
        writer.add_layer_norm_eps(float(c.norm_eps))
        writer.add_rope_dimension_count(c.rotary_dim)
        writer.add_rope_freq_base(float(c.rope_theta))
        writer.add_parallel_residual(c.parallel_residual)
    else:
        _write_llama_metadata(writer, c)
    for key, value in tokenizer.gguf_metadata(c.vocab_size).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def _write_llama_metadata(writer: GGUFWriter, c: ModelConfig) -> None:
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_dimension_count(c.rotary_dim)
    if c.hd != c.n_embd // c.n_head:
        writer.add_key_length(c.hd)
        writer.add_value_length(c.hd)
    writer.add_rope_freq_base(float(c.rope_theta))
    long = longrope(c)
    if long is not None:  # Phi-3: the factors are tensors (`gguf_tensors`)
        writer.add_rope_scaling_orig_ctx_len(long[0])
        writer.add_rope_scaling_attn_factors(long[1])
    elif c.rope_scaling:
        writer.add_string(f"{writer.arch}.rope.scaling.type", "linear")
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(c.norm_eps))
    if c.attn_softcap is not None:
        writer.add_attn_logit_softcapping(float(c.attn_softcap))
    if c.final_softcap is not None:
        writer.add_final_logit_softcapping(float(c.final_softcap))
    if c.sliding_window is not None:
        writer.add_sliding_window(c.sliding_window)
        if c.window_layers is not None:  # per layer: True where it slides
            writer.add_sliding_window_pattern([c.window(i) is not None for i in range(c.n_layer)])


def gguf_tensors(model: Transformer) -> list[tuple[str, Tensor]]:
    """(llama.cpp name, tensor in llama.cpp's layout) for every weight of a plain `model`."""
    config = model.config
    tensors = [
        (gguf_name(hf_name, config.family), to_gguf_layout(hf_name, t.detach(), config))
        for hf_name, t in convert.to_hf(model.state_dict(), config).items()
    ]
    if longrope(config) is not None:
        tensors += [
            (name, torch.tensor(config.rope_scaling[key], dtype=torch.float32))
            for key, name in ROPE_FACTORS.items()
        ]
    return tensors


def export_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    *,
    quant: str = "f16",
    name: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write `model` (a plain Transformer, adapters merged first) and `tokenizer`
    to the GGUF file `path`, atomically. `quant`: one of `QUANTS` for the matrices (see
    `_tensor_type`; K_QUANTS are written as f32 to a scratch file beside `path`, then quantized
    by llama.cpp); `name` goes in general.name (default: the file's stem), `base_model` (the hub
    id or path it was fine-tuned from) in general.base_model.0.*. An existing `path`
    is refused unless `overwrite`, and never replaced when it is one of `inputs`."""
    path = Path(path).expanduser()
    check_quant(quant)
    check_file_target(path, overwrite=overwrite, ours=written_by_nanotune, inputs=inputs)
    check_exportable(model, str(path))
    qtype, file_type = QUANTS["f32" if quant in K_QUANTS else quant]
    tensors = gguf_tensors(model)
    names = {n for n, _ in tensors}
    # Every type is chosen (and a tensor no type fits refused) before anything is written.
    kinds = [
        _tensor_type(
            n,
            tuple(t.shape),
            qtype,
            head=n == "output.weight"
            or (n == "token_embd.weight" and "output.weight" not in names),
            where=str(path),
        )
        for n, t in tensors
    ]
    clean_leftovers(path)
    name = name or path.stem
    with atomic_file(path) as tmp:
        if quant in K_QUANTS:
            with scratch_file(path) as f32:
                _write(f32, model, tokenizer, name, file_type, tensors, kinds, base_model)
                _llama_quantize(f32, tmp, QUANTS[quant][1], str(path))
        else:
            _write(tmp, model, tokenizer, name, file_type, tensors, kinds, base_model)
    return path


def _write(
    path: Path,
    model: Transformer,
    tokenizer: Tokenizer,
    name: str,
    file_type: LlamaFileType,
    tensors: list[tuple[str, Tensor]],
    kinds: list[GGMLQuantizationType],
    base_model: str | None = None,
) -> None:
    writer = GGUFWriter(path, GGUF_ARCH[model.config.family])
    _write_metadata(writer, model, tokenizer, name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_string(WRITER_KEY, __version__)
    if base_model:  # what the Hub and `nanotune push`'s model card name as the base
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
        if HUB_ID.match(base_model):
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    for (gguf, tensor), kind in zip(tensors, kinds, strict=True):
        w = np.ascontiguousarray(tensor.to("cpu", torch.float32).numpy())
        writer.add_tensor(gguf, quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

"""llama.cpp GGUF LoRA adapters out: a PEFT LoRA folder (a nanotune LoRA run's `final/`) as the
file llama.cpp's convert_lora_to_gguf writes, which `llama-server --lora` (and Ollama's ADAPTER)
applies on top of the base model's GGUF (`weights.gguf_export`).

The layout llama.cpp's adapter loader expects: general.type = adapter, adapter.type = lora,
adapter.lora.alpha, and for each adapted base tensor `<name>` (e.g. `blk.0.attn_q.weight`) the
pair `<name>.lora_a` [r, in] and `<name>.lora_b` [out, r] (numpy order; ggml reports the shapes
reversed). llama.cpp adds `alpha / r * B @ A` with r the pair's own rank, so a pair whose scale is
another (rsLoRA, alpha_pattern) has the difference folded into its B. The base file holds Llama's
Q/K rows in llama.cpp's rotary order, so lora_b's rows are permuted the same way (A's columns are
the input, untouched); GPT-2's one c_attn pair is the fused attn_qkv's, in nn.Linear orientation
as PEFT keeps it, and GPT-NeoX's query_key_value pair has its B rows moved from the per-head
interleaving to llama.cpp's [q, k, v], as the base weight's rows are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

from nanotune.files.atomic import atomic_file, check_file_target, clean_leftovers
from nanotune.models.transformer import Transformer
from nanotune.version import __version__
from nanotune.weights.gguf import GGUF_ARCH, WRITER_KEY, written_by_nanotune
from nanotune.weights.gguf_export import check_exportable, gguf_name, to_gguf_layout
from nanotune.weights.peft import hf_lora_pairs, read_adapter_config

ALPHA_KEY = "adapter.lora.alpha"
MERGE_INSTEAD = "export it merged instead: nanotune export --format gguf --adapter DIR OUT.gguf"


def lora_tensors(
    base: Transformer, adapter: str | os.PathLike
) -> tuple[float, dict[str, np.ndarray]]:
    """(adapter.lora.alpha, {GGUF tensor name: float32 array}) of the adapter folder on `base`."""
    config = base.config
    alpha = float(read_adapter_config(adapter).get("lora_alpha", 8))
    tensors: dict[str, np.ndarray] = {}
    for module, A, B, scale in hf_lora_pairs(base, adapter, MERGE_INSTEAD):
        applied = alpha / A.shape[0] if alpha else 1.0  # llama.cpp's scale (1 without alpha)
        B = B.float() * (scale / applied)
        weight = f"{module}.weight"
        if config.family != "gpt2":  # Q/K row order; GPT-2's pairs are [out, r] already
            B = to_gguf_layout(weight, B, config)
        name = gguf_name(weight, config.family)
        tensors[f"{name}.lora_a"] = _array(A)
        tensors[f"{name}.lora_b"] = _array(B)
    return alpha, tensors


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def export_gguf_lora(
    base: Transformer,
    adapter: str | os.PathLike,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the LoRA adapter folder `adapter`, checked against its plain `base` model, as a GGUF
    LoRA adapter at `path`, atomically (f32, convert_lora_to_gguf's default). DoRA adapters and
    ones that train the embedding or add tokens are refused: only a merged model carries those.
    An existing `path` is refused unless `overwrite`, and never replaced when it is an input."""
    path = Path(path).expanduser()
    check_file_target(path, overwrite=overwrite, ours=written_by_nanotune, inputs=inputs)
    check_exportable(base, str(path))
    alpha, tensors = lora_tensors(base, adapter)
    clean_leftovers(path)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, GGUF_ARCH[base.config.family])
        writer.add_type("adapter")
        writer.add_name(name or path.stem)
        writer.add_string("adapter.type", "lora")
        writer.add_float32(ALPHA_KEY, alpha)
        writer.add_string(WRITER_KEY, __version__)
        for tensor_name, data in tensors.items():
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path

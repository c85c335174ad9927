"""Weights in and out: Hugging Face folders, hub ids, GGUF files, presets.

`load_model(name)` gives a ready (Transformer, Tokenizer); `save_model` writes an HF folder that
transformers loads. Name resolution (preset → local path → package → hub) is in `resolve`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanotune.errors import NanotuneError
from nanotune.models.config import ModelConfig
from nanotune.models.transformer import Transformer
from nanotune.tokenizer import Tokenizer, gpt2_tokenizer
from nanotune.weights import hub
from nanotune.weights.gguf import gguf_tokenizer, load_gguf_model, open_gguf
from nanotune.weights.hf import load_hf_model, read_config, save_model
from nanotune.weights.resolve import Resolved, resolve

__all__ = ["Resolved", "load_model", "model_path", "resolve", "save_model"]


def model_path(name_or_path: str | Path) -> Path:
    """Local folder or .gguf file for a name, downloading hub ids (or reading them from cache)."""
    name = str(name_or_path)
    found = resolve(name)
    if found.path is not None:
        return found.path
    return hub.download(found.hub_id, name=name)


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for a preset, alias, local HF folder, .gguf file or hub id.

    Resolution order (see `resolve`): preset/alias (its installed package file, else its hub
    id) → local path (folder with config.json, or .gguf) → hub id `owner/name` through
    huggingface_hub's cache (offline when HF_HUB_OFFLINE is set). The model is in eval mode.
    """
    path = model_path(name_or_path)
    if path.suffix == ".gguf":
        reader = open_gguf(path)  # parsed once for both weights and vocabulary
        model = load_gguf_model(path, dtype=dtype, device=device, reader=reader)
        return model, gguf_tokenizer(reader, str(path))
    config = read_config(path)
    tokenizer = _dir_tokenizer(path, config)
    return load_hf_model(path, dtype=dtype, device=device), tokenizer


def _dir_tokenizer(path: Path, config: ModelConfig) -> Tokenizer:
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        return Tokenizer.from_dir(path)
    if config.family == "gpt2":
        # Many GPT-2 checkpoints are saved without tokenizer files; the BPE is always the same.
        return gpt2_tokenizer()
    raise NanotuneError(
        f"{path} has no tokenizer files (tokenizer.json); save the model's tokenizer there"
    )

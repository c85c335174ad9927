"""Hugging Face model folders: config.json + safetensors (or a pickle read with weights_only)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_dir
from nanotune.files.read import (
    check_finite,
    read_json_object,
    read_safetensors,
    read_torch_pickle,
)
from nanotune.models.config import ModelConfig
from nanotune.models.transformer import Transformer
from nanotune.weights import convert
from nanotune.weights.build import build_model
from nanotune.weights.resolve import hub_id_of

if TYPE_CHECKING:
    from nanotune.tokenizer import Tokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MODEL_FIX = "re-download or re-save the model"
# ModelConfig sizes read from config.json; a string or 0 there would fail deep inside torch.
SIZES = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "head_dim",
    "intermediate_size",
)


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory).expanduser() / "config.json"
    hf = read_json_object(path, "an HF model folder's config.json", MODEL_FIX)
    try:
        config = convert.config_from_hf(hf, where=str(path))
    except KeyError as e:
        raise NanotuneError(f"{path}: required key {e} is missing; {MODEL_FIX}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        # ModelConfig's own checks (heads dividing the width), run on whatever the file holds.
        raise NanotuneError(f"{path}: inconsistent or mistyped sizes ({e}); {MODEL_FIX}") from None
    for name in SIZES:
        value = getattr(config, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise NanotuneError(f"{path}: {name} must be a positive integer, got {value!r}")
    for name in ("norm_eps", "rope_theta"):  # JSON allows NaN and Infinity
        value = getattr(config, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            raise NanotuneError(f"{path}: {name} must be a positive finite number, got {value!r}")
    return config


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path, "model weights", MODEL_FIX)


def _load_pickle(path: Path) -> dict[str, Tensor]:
    return read_torch_pickle(path, "model weights", MODEL_FIX)


def _load_sharded(index_path: Path, load_one) -> dict[str, Tensor]:
    weight_map = read_json_object(index_path, "a sharded model's index", MODEL_FIX).get(
        "weight_map"
    )
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise NanotuneError(f"{index_path} has no 'weight_map' of shard files; {MODEL_FIX}")
    sd: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(load_one(index_path.parent / shard))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise NanotuneError(
            f"{index_path} lists tensors no shard holds (e.g. {missing[0]!r}); {MODEL_FIX}"
        )
    return sd


def read_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """HF-named tensors from model.safetensors, its sharded index, or pytorch_model.bin.

    Weights holding NaN or inf are refused, naming the tensor.
    """
    d = Path(directory).expanduser()
    for name, load in (
        (SAFETENSORS, _load_safetensors),
        (SAFETENSORS_INDEX, lambda p: _load_sharded(p, _load_safetensors)),
        (PICKLE, _load_pickle),
        (PICKLE_INDEX, lambda p: _load_sharded(p, _load_pickle)),
    ):
        if (d / name).exists():
            sd = load(d / name)
            check_finite(sd, d / name, MODEL_FIX)
            return sd
    raise NanotuneError(
        f"no weights in {d}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}; "
        "save the model there (save_pretrained) or pass another folder"
    )


def load_hf_model(
    directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """A Transformer with the weights of an HF folder of a supported family (`convert`)."""
    directory = Path(directory).expanduser()
    config = read_config(directory)
    sd = convert.from_hf(read_state_dict(directory), config, where=str(directory))
    return build_model(config, sd, dtype=dtype, device=device, where=str(directory))


def save_model(
    model: Transformer,
    tokenizer: Tokenizer,
    directory: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    base_model: str | None = None,
) -> Path:
    """Write an HF folder (config, safetensors, generation config, tokenizer) atomically.

    `base_model`, the model this one was trained or merged from, goes in config.json as
    `_name_or_path` (its hub id or absolute path, as transformers records it).

    An existing non-empty `directory` is refused unless `overwrite=True`, and even then only when
    nanotune wrote it and it is none of `inputs` (see `files.atomic.check_target`).
    """
    return atomic_dir(
        directory,
        lambda tmp: write_model(model, tokenizer, tmp, base_model),
        kind="model",
        overwrite=overwrite,
        inputs=inputs,
    )


def write_model(
    model: Transformer,
    tokenizer: Tokenizer,
    directory: Path,
    base_model: str | None = None,
    *,
    score: Tensor | None = None,
) -> None:
    """The files of an HF folder, into the existing `directory` (`save_model` makes it atomic).

    score: a sequence-classification head [num_labels, n_embd]; the folder is then the body of
    a GPT2/Llama/...ForSequenceClassification (its config and `score.weight` too), which
    transformers' AutoModelForSequenceClassification loads, reading the last non-pad token.
    """
    config = model.config
    sd = model.state_dict()
    extra = sorted(set(sd) - _plain_keys(config))
    if extra:
        raise NanotuneError(
            f"model has weights outside the base architecture (e.g. {extra[0]!r}); merge the "
            "adapters into the base weights before saving a full model, or save the adapter"
        )
    hf_sd = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in convert.to_hf(sd, config).items()
    }
    dtype = next(iter(hf_sd.values())).dtype
    hf_config = convert.config_to_hf(config)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if base_model is not None:
        hf_config["_name_or_path"] = hub_id_of(base_model)
    if score is not None:
        family = convert.ARCHITECTURES[config.family]
        hf_config["architectures"] = [f"{family}ForSequenceClassification"]
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(score.shape[0])}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(score.shape[0])}
        hf_config["pad_token_id"] = tokenizer.pad_id
        hf_sd["score.weight"] = score.detach().to("cpu", dtype).contiguous().clone()
    # Vocabulary ids come from the tokenizer when it has them: it is what generation will use.
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_token_id
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else config.eos_token_id
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}
    d = Path(directory)
    (d / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    (d / "generation_config.json").write_text(
        json.dumps(generation, indent=2) + "\n", encoding="utf-8"
    )
    save_file(hf_sd, str(d / SAFETENSORS), metadata={"format": "pt"})
    tokenizer.save(d)


def _plain_keys(config: ModelConfig) -> set[str]:
    with torch.device("meta"):
        return set(Transformer(config).state_dict())

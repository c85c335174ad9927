"""Hugging Face model folders: config.json + safetensors (or a pickle read with weights_only)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from nanotune.errors import NanotuneError
from nanotune.models.config import ModelConfig
from nanotune.models.transformer import Transformer
from nanotune.weights import convert
from nanotune.weights.atomic import atomic_dir
from nanotune.weights.build import build_model

if TYPE_CHECKING:
    from nanotune.tokenizer import Tokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanotuneError(f"{path} is missing; an HF model folder needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{path} is not valid JSON ({e}); re-download or re-save it") from None
    if not isinstance(data, dict):
        raise NanotuneError(f"{path} should hold a JSON object")
    return data


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    return convert.config_from_hf(read_json(path), where=str(path))


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise NanotuneError(f"{path} is missing; re-download or re-save the model") from None
    except (SafetensorError, OSError) as e:
        raise NanotuneError(
            f"{path} is truncated or corrupt ({e}); re-download or re-save the model"
        ) from None


def _load_pickle(path: Path) -> dict[str, Tensor]:
    # weights_only=True: a checkpoint must not be able to run code on load.
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise NanotuneError(f"{path} is missing; re-download or re-save the model") from None
    except Exception as e:  # torch raises many types for bad pickles/zips
        raise NanotuneError(
            f"{path} could not be read as a weights-only PyTorch checkpoint ({e}); "
            "re-download it or convert it to safetensors"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise NanotuneError(f"{path} does not hold a plain state dict of tensors")
    return sd


def _load_sharded(index_path: Path, load_one) -> dict[str, Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise NanotuneError(f"{index_path} has no 'weight_map'; re-download the model")
    sd: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(load_one(index_path.parent / shard))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise NanotuneError(
            f"{index_path} lists tensors no shard holds (e.g. {missing[0]!r}); re-download the model"
        )
    return sd


def read_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """HF-named tensors from model.safetensors, its sharded index, or pytorch_model.bin."""
    d = Path(directory)
    if (d / SAFETENSORS).exists():
        return _load_safetensors(d / SAFETENSORS)
    if (d / SAFETENSORS_INDEX).exists():
        return _load_sharded(d / SAFETENSORS_INDEX, _load_safetensors)
    if (d / PICKLE).exists():
        return _load_pickle(d / PICKLE)
    if (d / PICKLE_INDEX).exists():
        return _load_sharded(d / PICKLE_INDEX, _load_pickle)
    raise NanotuneError(
        f"no weights in {d}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}; "
        "save the model there (save_pretrained) or pass another folder"
    )


def load_hf_model(
    directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """A Transformer with the weights of an HF GPT-2 or Llama folder."""
    config = read_config(directory)
    sd = convert.from_hf(read_state_dict(directory), config)
    return build_model(config, sd, dtype=dtype, device=device)


def save_model(
    model: Transformer,
    tokenizer: Tokenizer,
    directory: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write an HF folder (config, safetensors, generation config, tokenizer) atomically.

    An existing non-empty `directory` is refused unless `overwrite=True`, and even then only when
    nanotune wrote it and it is none of `inputs` (see `weights.atomic.check_target`).
    """
    return atomic_dir(
        directory,
        lambda tmp: write_model(model, tokenizer, tmp),
        kind="model",
        overwrite=overwrite,
        inputs=inputs,
    )


def write_model(model: Transformer, tokenizer: Tokenizer, directory: Path) -> None:
    """The files of an HF folder, into the existing `directory` (`save_model` makes it atomic)."""
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

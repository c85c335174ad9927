"""What a run writes to `final/`, and how any nanotune output is loaded back.

The one place that decides both, so the writer and every reader (generate, chat, classify, eval,
merge, export) agree:

| run | `final/` | loaded back as |
|---|---|---|
| LoRA, DoRA, QLoRA (added tokens and trained embeddings included) | PEFT adapter + tokenizer | base model + adapter |
| classifier, LoRA body | `classifier.json` + PEFT SEQ_CLS adapter (head inside) | base + adapter + head |
| classifier, full or last_n body | `classifier.json` + HF folder + `classifier.safetensors` | folder + head |
| reward model (one output), any body (LoRA merged) | the same, and the folder is an HF `…ForSequenceClassification` (num_labels 1) | folder + head; transformers: AutoModelForSequenceClassification |
| full, last_n | HF model folder | the folder |

Every `final/` also holds a model card, `README.md` (`jobs/card.py`). The base is recorded by its
hub id (or absolute path) so transformers and PEFT find it; `weights.resolve` maps a preset's hub
id back to the preset, so SmolLM2 still loads offline from its package.

A LoRA run is never merged on save: merged onto a QLoRA run's NF4-rounded base, every weight the
run never touched would be written rounded. `merge` folds an adapter in when asked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from nanotune.config import RunConfig
from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_dir, check_target
from nanotune.jobs.card import model_card
from nanotune.methods import SequenceClassifier, lora_layers
from nanotune.methods.lora import merge as merge_lora
from nanotune.models import DEFAULT_MODEL
from nanotune.models.decoding import DecodeDtype, for_decoding
from nanotune.tokenizer import Tokenizer
from nanotune.weights import hub, load_model, save_model
from nanotune.weights.classifier import (
    CLASSIFIER_FILE,
    adapter_labels,
    load_classifier,
    save_classifier,
    write_classifier,
)
from nanotune.weights.hf import write_model
from nanotune.weights.peft import (
    CONFIG_FILE,
    adapter_tokenizer,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

Loaded = tuple[nn.Module, Tokenizer]
CARD_FILE = "README.md"  # the model card the Hub shows


def save_final(
    model: nn.Module,
    tokenizer: Tokenizer,
    config: RunConfig,
    final: Path,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    data_stats: dict[str, Any] | None = None,
) -> Path:
    """Write a trained model to `final/` in its form from the table above, with its model card
    (README.md, from the run's config and before/after metrics), all in one atomic swap."""
    base = config.model.name
    classifier = isinstance(model, SequenceClassifier)
    if classifier and model.num_labels == 1 and lora_layers(model.body):
        # A reward model is saved merged, as the sequence-classification folder transformers
        # loads (`eval.reward_model` names it); the trained model gets its adapters back.
        with _merged(model.body):
            return save_final(
                model, tokenizer, config, final, before=before, after=after, data_stats=data_stats
            )
    adapter = bool(lora_layers(model.body if classifier else model))

    def write(tmp: Path) -> None:
        if classifier:
            write_classifier(model, tmp, tokenizer, base)
        elif adapter:
            save_adapter(model, tmp, base)
            tokenizer.save(tmp)
        else:
            write_model(model, tokenizer, tmp, base)
        text = model_card(
            config.to_dict(),
            adapter=adapter,
            classifier=classifier,
            before=before,
            after=after,
            data_stats=data_stats,
        )
        (tmp / CARD_FILE).write_text(text, encoding="utf-8")

    kind = "classifier" if classifier else "adapter" if adapter else "model"
    return atomic_dir(final, write, kind=kind)


@contextlib.contextmanager
def _merged(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every adapter folded into its base weight, then its LoRA layers put back
    (no copy of the model: NF4 weights cannot be deep-copied)."""
    layers = lora_layers(model)
    merge_lora(model)
    try:
        yield model
    finally:
        for path, layer in layers.items():
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)


def base_of(adapter: str | os.PathLike) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`)."""
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise NanotuneError(
            f"{Path(adapter) / CONFIG_FILE}: names no base_model_name_or_path; pass --model"
        )
    return base


def apply_adapter(model: nn.Module, tokenizer: Tokenizer, adapter: str | os.PathLike) -> Loaded:
    """`model` with the adapter folder loaded onto it, and the tokenizer saved with the adapter
    (it holds the run's added tokens and chat template)."""
    load_adapter(model, adapter)
    return model, adapter_tokenizer(adapter, tokenizer)


def load(
    model: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: DecodeDtype = "float32",
) -> Loaded:
    """Any nanotune output, ready for inference: a model name or folder, a run's `final/`
    (adapter or classifier folder), or a base with `adapter`; in `dtype` for decoding
    (`models.decoding`), adapters merged first (in float32) for a reduced dtype, so a step costs
    one matmul per layer and rounds once.

    Without `model`, the base comes from the adapter's config (else the default model).
    """
    loaded, tokenizer = _load(model, adapter)
    if dtype != "float32":
        merge_lora(loaded)
    return for_decoding(loaded, dtype), tokenizer


def _load(model: str | None, adapter: str | os.PathLike | None) -> Loaded:
    if adapter is None and model is not None and (Path(model) / CLASSIFIER_FILE).is_file():
        return load_classifier(model)
    if adapter is None and model is not None and (Path(model) / CONFIG_FILE).is_file():
        model, adapter = None, model  # a LoRA run's final/ passed as the model
    if adapter is not None and (Path(adapter) / CLASSIFIER_FILE).is_file():
        return load_classifier(adapter)
    if model is None:
        model = base_of(adapter) if adapter is not None else DEFAULT_MODEL
    loaded, tokenizer = load_model(model)
    if adapter is not None:
        loaded, tokenizer = apply_adapter(loaded, tokenizer, adapter)
    return loaded.eval(), tokenizer


def merge(
    base: str | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Fold the adapter folder into its base and write a plain HF folder (a classifier folder
    with the head for SEQ_CLS adapters). The base defaults to the adapter's own."""
    base = base or base_of(adapter)
    target = Path(out)
    inputs = [p for p in (base, adapter) if Path(p).exists()]
    # Refuse before the (slow) load; the savers check again and write atomically.
    check_target(target, overwrite=overwrite, inputs=inputs)
    model, tokenizer = load_model(base)
    tokenizer = adapter_tokenizer(adapter, tokenizer)
    if read_adapter_config(adapter).get("task_type") != "SEQ_CLS":
        load_adapter(model, adapter)
        merged = merge_lora(model)
        return save_model(
            merged, tokenizer, target, overwrite=overwrite, inputs=inputs, base_model=base
        )
    names = adapter_labels(adapter)
    clf = load_adapter(SequenceClassifier(model, len(names), names), adapter)
    clf.body = merge_lora(clf.body)
    return save_classifier(clf, target, tokenizer, overwrite=overwrite, inputs=inputs)


def push_folder(path: str | os.PathLike) -> Path:
    """What `nanotune push` uploads: a run's `final/`, or a folder that is itself an output."""
    path = Path(path).expanduser()
    for folder in (path / "final", path):
        if any((folder / f).is_file() for f in (CONFIG_FILE, CLASSIFIER_FILE, "config.json")):
            return folder
    raise NanotuneError(
        f"{path}: neither a run directory with final/ nor an adapter or model folder "
        f"({CONFIG_FILE} or config.json); pass the run's output_dir or its final/ folder"
    )


def check_push(repo_id: str, token: str | None = None) -> str:
    """The token a push to `repo_id` will use; refused (one line) offline or without one."""
    return hub.push_token(repo_id, token)


def push(
    path: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a run's `final/` (or an output folder) to the Hub repository `repo_id`; its URL."""
    folder = push_folder(path)
    return hub.upload(folder, repo_id, private=private, token=token)

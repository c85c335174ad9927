"""Classifier folders: `classifier.json` (labels, format) beside a PEFT SEQ_CLS adapter or an HF
model folder plus `classifier.safetensors` (the head)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_dir
from nanotune.files.read import read_json_object, read_safetensors
from nanotune.methods.classifier import SequenceClassifier
from nanotune.methods.lora import lora_layers
from nanotune.weights import load_model
from nanotune.weights.hf import write_model
from nanotune.weights.peft import (
    ADAPTER_FIX,
    PREFIX,
    adapter_tokenizer,
    load_adapter,
    read_adapter_tensors,
    save_adapter,
)
from nanotune.weights.resolve import hub_id_of

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "classifier.safetensors"


def write_classifier(
    model: SequenceClassifier, directory: Path, tokenizer, base_model: str | None = None
) -> None:
    """The files of a classifier folder, into the existing `directory` (`save_classifier` makes
    it atomic)."""
    as_adapter = bool(lora_layers(model.body))
    if as_adapter and base_model is None:
        raise NanotuneError(
            "save_classifier: a classifier with LoRA adapters is saved as an adapter over its "
            "base model; pass base_model, or merge the adapters first"
        )
    if as_adapter:
        save_adapter(model, directory, base_model)
        tokenizer.save(directory)
    else:
        # A reward model (one output) is also the sequence-classification folder transformers
        # loads, so `eval.reward_model` can name it; nanotune reads the head file.
        score = model.score.weight if model.num_labels == 1 else None
        write_model(model.body, tokenizer, directory, base_model, score=score)
        save_file(
            {"score.weight": model.score.weight.detach().cpu().contiguous()},
            str(directory / HEAD_FILE),
        )
    meta = {
        "format": "adapter" if as_adapter else "full",
        "base_model": hub_id_of(base_model) if base_model is not None else None,
        "num_labels": model.num_labels,
        "label_names": model.label_names,
    }
    (directory / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_classifier(
    model: SequenceClassifier,
    directory: str | Path,
    tokenizer,
    base_model: str | None = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write a classifier folder atomically, with `classifier.json` naming its labels.

    With LoRA adapters in the body: a PEFT SEQ_CLS adapter folder over `base_model` (head in
    modules_to_save). Otherwise: the body as an HF folder plus the head in
    `classifier.safetensors` (merge the adapters first for that, `jobs.artifacts.merge`).
    """
    return atomic_dir(
        directory,
        lambda tmp: write_classifier(model, tmp, tokenizer, base_model),
        kind="classifier",
        overwrite=overwrite,
        inputs=inputs,
    )


def load_classifier(directory: str | Path):
    """(SequenceClassifier, Tokenizer) from a folder written by `save_classifier`."""
    path = Path(directory) / CLASSIFIER_FILE
    if not path.is_file():
        raise NanotuneError(f"{path}: no such file; is {directory} a classifier saved by nanotune?")
    meta = _read_meta(path)
    if meta["format"] == "adapter":
        body, tokenizer = load_model(meta["base_model"])
        clf = SequenceClassifier(body, len(meta["label_names"]), meta["label_names"])
        load_adapter(clf, directory)
        return clf.eval(), adapter_tokenizer(directory, tokenizer)  # holds any added tokens
    body, tokenizer = load_model(directory)
    clf = SequenceClassifier(body, len(meta["label_names"]), meta["label_names"])
    head = read_safetensors(Path(directory) / HEAD_FILE, "the classifier head", ADAPTER_FIX)
    if "score.weight" not in head or head["score.weight"].shape != clf.score.weight.shape:
        raise NanotuneError(
            f"{Path(directory) / HEAD_FILE}: needs score.weight of shape "
            f"{tuple(clf.score.weight.shape)}; {ADAPTER_FIX}"
        )
    with torch.no_grad():
        clf.score.weight.copy_(head["score.weight"])
    return clf.eval(), tokenizer


def adapter_labels(adapter: str | Path) -> list[str]:
    """Label names of a SEQ_CLS adapter folder: from nanotune's `classifier.json`, else (a
    peft-made classifier) numbered by the rows of its head."""
    meta_path = Path(adapter).expanduser() / CLASSIFIER_FILE
    if meta_path.is_file():
        return _read_meta(meta_path)["label_names"]
    score = read_adapter_tensors(adapter).get("score.weight")
    if score is None:
        raise NanotuneError(
            f"{adapter}: a SEQ_CLS adapter without {PREFIX}score.weight; save the head with it"
        )
    return [str(i) for i in range(score.shape[0])]


def _read_meta(path: Path) -> dict:
    """classifier.json, checked: labels, their count and the folder's format."""
    meta = read_json_object(path, "a nanotune classifier's labels", ADAPTER_FIX)
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise NanotuneError(f"{path}: label_names must be a list of strings; {ADAPTER_FIX}")
    if meta.get("num_labels", len(names)) != len(names):
        raise NanotuneError(f"{path}: num_labels differs from label_names; {ADAPTER_FIX}")
    if meta.get("format") not in ("adapter", "full"):
        raise NanotuneError(f"{path}: format must be 'adapter' or 'full'; {ADAPTER_FIX}")
    return meta

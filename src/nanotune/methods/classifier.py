"""Sequence classification head over the decoder, pooling the last real token."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.models.linear import Linear
from nanotune.models.transformer import Transformer


class SequenceClassifier(nn.Module):
    """`score(hidden at the last non-pad token)`, as Hugging Face's GPT2ForSequenceClassification.

    Rows are right-padded (docs/design.md), so the state at index `lengths - 1` has seen exactly
    the real tokens: causal attention keeps the pads after it out of its view.
    """

    def __init__(
        self, body: Transformer, num_labels: int, label_names: list[str] | None = None
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise NanotuneError(
                f"a classifier needs at least 2 labels, got num_labels={num_labels}"
            )
        names = [str(i) for i in range(num_labels)] if label_names is None else list(label_names)
        if len(names) != num_labels:
            raise NanotuneError(
                f"label_names has {len(names)} names for num_labels={num_labels}; give one per label"
            )
        self.body = body
        self.label_names = names
        self.score = Linear(
            body.config.n_embd,
            num_labels,
            bias=False,
            device=body.device,
            dtype=body.wte.weight.dtype,
        )
        nn.init.normal_(self.score.weight, std=0.02)

    @property
    def config(self):
        return self.body.config

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Logits [B, num_labels]; lengths [B] counts the real tokens of each row (>= 1)."""
        h = self.body.hidden(input_ids)
        pooled = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return self.score(pooled.to(self.score.weight.dtype))


CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "classifier.safetensors"


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

    With `base_model` and LoRA adapters in the body: a PEFT SEQ_CLS adapter folder (head in
    modules_to_save). Otherwise: the body (adapters merged) as an HF folder via `save_model`, plus
    the head in `classifier.safetensors`.
    """
    from nanotune.methods.lora import lora_layers, merge
    from nanotune.weights.atomic import atomic_dir
    from nanotune.weights.hf import write_model
    from nanotune.weights.peft import save_adapter

    as_adapter = base_model is not None and bool(lora_layers(model.body))

    def write(tmp: Path) -> None:
        if as_adapter:
            save_adapter(model, tmp, base_model)
            tokenizer.save(tmp)
        else:
            body = merge(copy.deepcopy(model.body)) if lora_layers(model.body) else model.body
            write_model(body, tokenizer, tmp)
            save_file(
                {"score.weight": model.score.weight.detach().cpu().contiguous()},
                str(tmp / HEAD_FILE),
            )
        meta = {
            "format": "adapter" if as_adapter else "full",
            "base_model": base_model,
            "num_labels": model.num_labels,
            "label_names": model.label_names,
        }
        (tmp / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_dir(directory, write, kind="classifier", overwrite=overwrite, inputs=inputs)


def load_classifier(directory: str | Path):
    """(SequenceClassifier, Tokenizer) from a folder written by `save_classifier`."""
    from nanotune.weights import load_model
    from nanotune.weights.peft import adapter_tokenizer, load_adapter

    path = Path(directory) / CLASSIFIER_FILE
    if not path.is_file():
        raise NanotuneError(f"{path}: no such file; is {directory} a classifier saved by nanotune?")
    meta = json.loads(path.read_text())
    if meta.get("format") == "adapter":
        body, tokenizer = load_model(meta["base_model"])
        clf = SequenceClassifier(body, meta["num_labels"], meta["label_names"])
        load_adapter(clf, directory)
        return clf.eval(), adapter_tokenizer(directory, tokenizer)  # holds any added tokens
    body, tokenizer = load_model(directory)
    clf = SequenceClassifier(body, meta["num_labels"], meta["label_names"])
    with torch.no_grad():
        clf.score.weight.copy_(load_file(str(Path(directory) / HEAD_FILE))["score.weight"])
    return clf.eval(), tokenizer


def classify(model: SequenceClassifier, tokenizer, text: str) -> dict[str, float]:
    """Label probabilities for one text, in label order."""
    return classify_batch(model, tokenizer, [text])[0]


def classify_batch(
    model: SequenceClassifier, tokenizer, texts: Sequence[str], batch_size: int = 32
) -> list[dict[str, float]]:
    """Label probabilities for each text, in label order, `batch_size` texts per forward pass.

    Each text is encoded as training encodes classification rows (BOS first when the model
    expects it); one longer than the context keeps its last tokens.
    """
    from nanotune.data.formats import bos

    block = model.config.block_size
    rows = [(bos(tokenizer) + ids)[-block:] for ids in tokenizer.encode_batch(texts)]
    for i, (text, ids) in enumerate(zip(texts, rows, strict=True)):
        if not text or not ids:
            raise NanotuneError(f"classify: text {i + 1} is empty; give some text to classify")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    # Similar lengths share a batch (less padding); rows are right-padded, and the pooled
    # last real token never sees the pads after it.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probs: list[list[float]] = [[] for _ in rows]
    device = model.body.device
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in chunk])
            lengths = torch.tensor([len(rows[i]) for i in chunk])
            logits = model(ids.to(device), lengths)
            for i, row in zip(chunk, torch.softmax(logits.float(), -1).tolist(), strict=True):
                probs[i] = row
    return [dict(zip(model.label_names, row, strict=True)) for row in probs]

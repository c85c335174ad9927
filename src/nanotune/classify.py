"""Label texts with a fine-tuned classifier (`nanotune classify`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanotune.data.formats import bos
from nanotune.errors import NanotuneError
from nanotune.methods.classifier import SequenceClassifier


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

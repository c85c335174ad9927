"""`nanotune classify`: a classifier run's labels and probabilities for texts."""

from __future__ import annotations

import json
from pathlib import Path

from nanotune.classify import classify_batch
from nanotune.errors import NanotuneError
from nanotune.jobs import artifacts
from nanotune.jobs.config import ClassifyCommand
from nanotune.methods import SequenceClassifier


def read_texts(path: str | Path) -> list[str]:
    """The texts of a file: one per non-blank line, or the `text` field of each .jsonl line."""
    p = Path(path)
    try:
        # Split on newlines only: str.splitlines also breaks at U+2028 inside a JSON string.
        lines = [line.rstrip("\r") for line in p.read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{p}: cannot read the texts ({e}); give a UTF-8 text file") from e
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            texts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanotuneError(f"{p}:{n}: not valid JSON ({e}); one object per line") from e
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise NanotuneError(f'{p}:{n}: needs a non-empty string field "text"')
        texts.append(text)
    if not texts:
        raise NanotuneError(f"{p}: holds no texts; put one text per line")
    return texts


def classify_command(c: ClassifyCommand) -> int:
    """One text: its label and every label's probability; more: one tab-separated line each."""
    texts = [*c.text, *(read_texts(c.file) if c.file else [])]
    model, tokenizer = artifacts.load(c.model)
    if not isinstance(model, SequenceClassifier):
        raise NanotuneError(
            f"{c.model}: not a classifier (no classifier.json); give the final/ folder of a "
            "classification run"
        )
    results = classify_batch(model, tokenizer, texts)
    if len(texts) == 1 and not c.file:
        (probs,) = results
        print(max(probs, key=probs.get))
        for name, p in probs.items():
            print(f"  {name}: {p:.4f}")
        return 0
    print("\t".join(["label", *model.label_names, "text"]))
    for text, probs in zip(texts, results, strict=True):
        shown = " ".join(text.split())  # one line per text, whatever whitespace it holds
        print("\t".join([max(probs, key=probs.get), *(f"{p:.4f}" for p in probs.values()), shown]))
    return 0

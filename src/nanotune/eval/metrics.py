"""Pure metric functions: perplexity, classification, SQuAD EM/F1, tag-set F1, tool calls.

All scores are fractions in [0, 1] (SQuAD's script prints percentages; we keep one scale so a
before/after table reads the same for every metric).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from nanotune.data.tools import parse_tool_calls
from nanotune.errors import NanotuneError

# --- language modelling ------------------------------------------------------------------------


def perplexity_from_nll(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per supervised token)."""
    if n_tokens <= 0:
        raise NanotuneError(
            "perplexity: the evaluation data has no supervised tokens; "
            "check the split and the format's label mask"
        )
    return math.exp(nll_sum / n_tokens)


# --- classification ----------------------------------------------------------------------------


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check_same_length(preds, labels)
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


def confusion_matrix(
    preds: Sequence[int], labels: Sequence[int], num_labels: int
) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    _check_same_length(preds, labels)
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for p, y in zip(preds, labels, strict=True):
        matrix[y][p] += 1
    return matrix


def classification_metrics(
    preds: Sequence[int], labels: Sequence[int], label_names: Sequence[str]
) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro-F1 and the confusion matrix.

    A class never predicted (or never present) gets precision (recall) 0, as scikit-learn's
    `zero_division=0`; macro-F1 averages over every named class.
    """
    n = len(label_names)
    matrix = confusion_matrix(preds, labels, n)
    per_class = {}
    for c, name in enumerate(label_names):
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in range(n))
        support = sum(matrix[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "accuracy": accuracy(preds, labels),
        "macro_f1": sum(m["f1"] for m in per_class.values()) / n,
        "per_class": per_class,
        "confusion": {"labels": list(label_names), "matrix": matrix},
    }


def _check_same_length(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise NanotuneError("classification metrics: the evaluation split is empty")


# --- SQuAD -------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation, articles, extra spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 after normalisation, maximised over the gold answers.

    An empty side scores 1 only if both are empty (SQuAD v2's rule; v1.1 scored it 0).
    """
    pred = normalize_answer(prediction).split()
    return max((_token_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


def _token_f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean SQuAD exact match and F1 over examples (each with one or more gold answers)."""
    _check_same_length(predictions, golds)
    em = sum(squad_exact_match(p, g) for p, g in zip(predictions, golds, strict=True))
    f1 = sum(squad_f1(p, g) for p, g in zip(predictions, golds, strict=True))
    return {"squad_em": em / len(golds), "squad_f1": f1 / len(golds)}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of generations equal to the reference, ignoring only surrounding whitespace."""
    _check_same_length(predictions, references)
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


# --- tool calls ---------------------------------------------------------------------------------


def _calls(text: str) -> list[tuple[str, Any]]:
    """(name, arguments) of each call in a reply, in order."""
    _, calls = parse_tool_calls(text)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def tool_call_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """tool_call: the fraction of answers whose parsed calls equal the reference's (names and
    arguments as JSON values, in order; an answer without calls matches a reference without
    calls when the texts are equal); tool_call_name: the same for the names alone."""
    _check_same_length(predictions, references)
    exact = names = 0
    for p, r in zip(predictions, references, strict=True):
        got, want = _calls(p), _calls(r)
        if not want:
            hit = not got and p.strip() == r.strip()
            exact, names = exact + hit, names + hit
            continue
        exact += got == want
        names += [n for n, _ in got] == [n for n, _ in want]
    return {"tool_call": exact / len(references), "tool_call_name": names / len(references)}


# --- tag sets (the quotes task: "love, life, inspirational") -------------------------------------

_TAG_EDGES = string.punctuation + string.whitespace


def parse_tags(text: str) -> set[str]:
    """Comma-separated tags, lowercased, whitespace collapsed, edge punctuation/quotes stripped."""
    tags = (" ".join(t.lower().split()).strip(_TAG_EDGES) for t in text.split(","))
    return {t for t in tags if t}


def tag_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Tag-set precision/recall/F1: micro (pooled counts) and macro (mean per-example F1).

    An example whose predicted and reference sets are both empty has F1 1.
    """
    _check_same_length(predictions, references)
    tp = fp = fn = 0
    per_example = []
    for p, r in zip(predictions, references, strict=True):
        pred, gold = parse_tags(p), parse_tags(r)
        hit = len(pred & gold)
        tp, fp, fn = tp + hit, fp + len(pred) - hit, fn + len(gold) - hit
        denom = len(pred) + len(gold)
        per_example.append(2 * hit / denom if denom else 1.0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    micro = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tag_precision": precision,
        "tag_recall": recall,
        "tag_f1_micro": micro,
        "tag_f1_macro": sum(per_example) / len(per_example),
    }

"""Evaluators: run a model over batches or examples and return metric dicts.

They follow the batch contracts of docs/design.md and know nothing of training. Every evaluator
puts the model in eval mode under `torch.inference_mode()` and restores its mode afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.eval.metrics import (
    classification_metrics,
    exact_match,
    perplexity_from_nll,
    squad_scores,
    tag_scores,
    tool_call_scores,
)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[torch.device]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def perplexity(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Mean loss and perplexity over the supervised tokens of LM batches.

    Logits are computed only where a target exists: `model.hidden` gathered at those rows, then
    `model.lm_head`, so prompt and padding positions never pay for the vocabulary projection.
    """
    nll, n = 0.0, 0
    with _eval_mode(model) as device:
        for batch in batches:
            targets = batch["targets"].to(device)
            mask = targets != -100
            if not mask.any():
                continue
            extra = {k: batch[k].to(device) for k in ("positions", "doc_ids") if k in batch}
            h = model.hidden(batch["input_ids"].to(device), **extra)
            logits = model.lm_head(h[mask]).float()
            nll += F.cross_entropy(logits, targets[mask], reduction="sum").item()
            n += int(mask.sum())
    ppl = perplexity_from_nll(nll, n)
    return {"loss": nll / n, "perplexity": ppl, "tokens": n}


def preference_eval(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """How often the model ranks each pair's chosen response above its rejected one, over
    preference batches (a row per pair: `data.batching.collate_preference`), and the mean margin.

    A policy (`model.hidden`, `model.lm_head`) ranks by the summed log-probability of the
    response, and also gets the loss and perplexity of the chosen responses; a reward model
    (`model(input_ids, ends, **layout) -> [B, 2, 1]`) ranks by its score.
    """
    policy = hasattr(model, "hidden")
    correct = pairs = tokens = 0
    margin = nll = 0.0
    with _eval_mode(model) as device:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            layout = {k: batch[k].to(device) for k in ("positions", "branch_ids")}
            B = ids.shape[0]
            if policy:
                targets = batch["targets"].to(device)  # [B, 2, T]
                keep = targets != -100
                row, response, position = keep.nonzero(as_tuple=True)
                h = model.hidden(ids, **layout)
                logp = torch.log_softmax(model.lm_head(h[row, position]).float(), -1)
                per_token = logp.gather(1, targets[keep][:, None]).squeeze(1)
                value = torch.zeros(B * 2, device=device).index_add(
                    0, row * 2 + response, per_token
                )
                value = value.view(B, 2)
                nll -= float(value[:, 0].sum())
                tokens += int(keep[:, 0].sum())
            else:
                value = model(ids, batch["ends"].to(device), **layout).float().squeeze(-1)
            correct += int((value[:, 0] > value[:, 1]).sum())
            margin += float((value[:, 0] - value[:, 1]).sum())
            pairs += B
    out = {"preference_accuracy": correct / pairs, "preference_margin": margin / pairs}
    if policy:
        out |= {"loss": nll / tokens, "perplexity": perplexity_from_nll(nll, tokens)}
    return out | {"pairs": pairs}


def classification_eval(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1 (`f1/<name>`), loss, and nested details for reports.

    `model(input_ids, lengths) -> logits [B, num_labels]` (a `SequenceClassifier`). Label names
    default to the model's `label_names`, then to the class indices.
    """
    preds: list[int] = []
    labels: list[int] = []
    loss, num_labels = 0.0, 0
    with _eval_mode(model) as device:
        for batch in batches:
            logits = model(batch["input_ids"].to(device), batch["lengths"].to(device)).float()
            y = batch["class_labels"].to(device)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            preds += logits.argmax(-1).tolist()
            labels += y.tolist()
            num_labels = logits.shape[-1]
    names = list(label_names or getattr(model, "label_names", None) or range(num_labels))
    names = [str(n) for n in names]
    if len(names) != num_labels:
        raise NanotuneError(
            f"classification eval: {len(names)} label names for a {num_labels}-way classifier; "
            "pass one name per class"
        )
    m = classification_metrics(preds, labels, names)
    flat = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "loss": loss / len(labels)}
    flat |= {f"f1/{name}": c["f1"] for name, c in m["per_class"].items()}
    return flat | {"per_class": m["per_class"], "confusion": m["confusion"]}


# --- generation --------------------------------------------------------------------------------


@dataclass
class Generations:
    """What a model generated for each prompt of a split, beside the reference answers."""

    prompts: list[str]
    references: list[str]
    outputs: list[str]


def split_prompt(
    ids: Sequence[int], labels: Sequence[int], where: str = "example"
) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the unsupervised prefix and the first supervised span after it.

    This reuses the training format exactly, so the model is prompted as it was trained.
    """
    start = next((i for i, y in enumerate(labels) if y != -100), None)
    if start is None:
        raise NanotuneError(f"{where}: no supervised tokens, so there is no reference answer")
    if start == 0:
        raise NanotuneError(
            f"{where}: every token is supervised, so the prompt cannot be told from the answer; "
            "evaluate with train_on_prompt off"
        )
    end = start
    while end < len(labels) and labels[end] != -100:
        end += 1
    return list(ids[:start]), list(ids[start:end])


def generate_for_eval(
    model: nn.Module, tokenizer: Any, examples: Sequence[Any], cfg: EvalConfig
) -> Generations:
    """Generate from each example's prompt (`Example(ids, labels)`), `cfg.batch_size` at a time."""
    from nanotune.generate import GenerationConfig, generate

    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=0.0 if cfg.greedy else cfg.temperature,
        seed=cfg.seed,
    )
    pairs = [split_prompt(ex.ids, ex.labels, f"eval example {i}") for i, ex in enumerate(examples)]
    outputs: list[str] = []
    with _eval_mode(model):
        for i in range(0, len(pairs), cfg.batch_size):
            prompt_ids = [p for p, _ in pairs[i : i + cfg.batch_size]]
            outputs += generate(model, tokenizer, prompt_ids, gen_cfg)
    return Generations(
        prompts=[tokenizer.decode(p) for p, _ in pairs],
        references=[tokenizer.decode(r, skip_special=True).strip() for _, r in pairs],
        outputs=[o.strip() for o in outputs],
    )


def generation_metrics(
    gens: Generations, metrics: Sequence[str], golds: Sequence[Sequence[str]] | None = None
) -> dict[str, float]:
    """EM / SQuAD EM+F1 / tag-set F1 of generations; `golds` gives several answers per example."""
    out: dict[str, float] = {}
    if "exact_match" in metrics:
        out["exact_match"] = exact_match(gens.outputs, gens.references)
    if "squad" in metrics:
        out |= squad_scores(gens.outputs, golds or [[r] for r in gens.references])
    if "tag_f1" in metrics:
        out |= tag_scores(gens.outputs, gens.references)
    if "tool_call" in metrics:
        out |= tool_call_scores(gens.outputs, gens.references)
    return out


def samples(
    before: Generations, after: Generations | None = None, n: int = 5
) -> list[dict[str, str]]:
    """Side-by-side sample generations for a report: prompt, reference, before, after."""
    rows = []
    for i in range(min(n, len(before.prompts))):
        row = {
            "prompt": before.prompts[i],
            "reference": before.references[i],
            "before": before.outputs[i],
        }
        if after is not None:
            row["after"] = after.outputs[i]
        rows.append(row)
    return rows

"""Run an EvalConfig over examples, and the same evaluation before and after fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nanotune.data import ClassExample, epoch_batches
from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.eval.evaluate import (
    Generations,
    classification_eval,
    generate_for_eval,
    generation_metrics,
    perplexity,
    samples,
)
from nanotune.eval.reward import RewardModel, compare_rewards


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    cfg: EvalConfig,
    label_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], Generations | None]:
    """Every metric of `cfg` except `reward` (it compares two models), on the first
    `cfg.max_examples` examples. Returns the metrics and the generations (None if none were made).
    """
    if not examples:
        raise NanotuneError(f"eval: the {cfg.split} split has no examples")
    examples = list(examples[: cfg.max_examples])
    classify = isinstance(examples[0], ClassExample)
    lm_metrics = [m for m in cfg.metrics if m != "accuracy"]
    if classify and lm_metrics:
        raise NanotuneError(
            f"eval.metrics: {', '.join(lm_metrics)} need a language-model format, but the data is "
            "classification; use metrics: [accuracy]"
        )
    if not classify and "accuracy" in cfg.metrics:
        raise NanotuneError(
            "eval.metrics: accuracy needs format: classification data; for generated answers use "
            "exact_match, squad or tag_f1"
        )
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    metrics: dict[str, Any] = {}
    if "perplexity" in cfg.metrics or "accuracy" in cfg.metrics:
        batches = epoch_batches(examples, cfg.batch_size, 0, 0, pad_id=pad_id, shuffle=False)
        if classify:
            metrics |= classification_eval(model, batches, label_names)
        else:
            metrics |= perplexity(model, batches)
    gens = None
    if cfg.generation_metrics:
        gens = generate_for_eval(model, tokenizer, examples, cfg)
        metrics |= generation_metrics(gens, cfg.generation_metrics)
    return metrics, gens


@dataclass
class BeforeAfter:
    """Metrics of the base and the fine-tuned model on the same examples, with samples."""

    before: dict[str, Any]
    after: dict[str, Any]
    samples: list[dict[str, str]] = field(default_factory=list)


def evaluate_before_after(
    model: nn.Module,
    tokenizer: Any,
    finetune: Callable[[nn.Module], nn.Module],
    examples: Sequence[Any],
    cfg: EvalConfig,
    label_names: Sequence[str] | None = None,
    reward: Any = None,
) -> BeforeAfter:
    """Evaluate `model`, then `finetune(model)` (which may change it in place, e.g. load an
    adapter, or return another model), with the same config, examples and prompts.

    The `reward` metric scores both models' responses with `reward` (anything with
    `score(prompts, responses, batch_size)`), by default a `RewardModel(cfg.reward_model)`.
    """
    before, gens_before = evaluate_model(model, tokenizer, examples, cfg, label_names)
    tuned = finetune(model)
    after, gens_after = evaluate_model(tuned, tokenizer, examples, cfg, label_names)
    if gens_before is None or gens_after is None:
        return BeforeAfter(before, after)
    if "reward" in cfg.metrics:
        rm = reward or RewardModel(cfg.reward_model, device=next(tuned.parameters()).device)
        rb, ra = compare_rewards(
            rm, gens_before.prompts, gens_before.outputs, gens_after.outputs, cfg.batch_size
        )
        before |= rb
        after |= ra
    return BeforeAfter(before, after, samples(gens_before, gens_after, cfg.num_samples))

"""Run an EvalConfig over examples, and the same evaluation before and after fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nanotune.data import IGNORE, Example, Task, epoch_batches
from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.eval.evaluate import (
    Generations,
    classification_eval,
    generate_for_eval,
    generation_metrics,
    perplexity,
    preference_eval,
    samples,
)
from nanotune.eval.reward import RewardModel, compare_rewards


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    cfg: EvalConfig,
    *,
    task: Task,
    label_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], Generations | None]:
    """Every metric of `cfg` except `reward` (it compares two models), on the first
    `cfg.max_examples` examples of a `task` (`Datasets.task`). Returns the metrics and the
    generations (None if none were made).
    """
    if not examples:
        raise NanotuneError(f"eval: the {cfg.split} split has no examples")
    examples = list(examples[: cfg.max_examples])
    if task == "preference":
        return _evaluate_pairs(model, tokenizer, examples, cfg)
    if "preference" in cfg.metrics:
        raise NanotuneError(
            f"eval.metrics: preference needs format: preference data (pairs), not {task} data"
        )
    classify = task == "classification"
    lm_metrics = [m for m in cfg.metrics if m != "accuracy"]
    if classify and lm_metrics:
        raise NanotuneError(
            f"eval.metrics: {', '.join(lm_metrics)} need a language-model format, but the data is "
            "classification; use metrics: [accuracy]"
        )
    if not classify and "accuracy" in cfg.metrics:
        raise NanotuneError(
            "eval.metrics: accuracy needs format: classification data; for generated answers use "
            "exact_match, squad, tag_f1 or tool_call"
        )
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    metrics: dict[str, Any] = {}
    if "perplexity" in cfg.metrics or "accuracy" in cfg.metrics:
        batches = epoch_batches(
            examples, cfg.batch_size, 0, 0, task=task, pad_id=pad_id, shuffle=False
        )
        if classify:
            metrics |= classification_eval(model, batches, label_names)
        else:
            metrics |= perplexity(model, batches)
    gens = None
    if cfg.generation_metrics:
        gens = generate_for_eval(model, tokenizer, examples, cfg)
        metrics |= generation_metrics(gens, cfg.generation_metrics)
    return metrics, gens


def _evaluate_pairs(
    model: nn.Module, tokenizer: Any, examples: list[Any], cfg: EvalConfig
) -> tuple[dict[str, Any], Generations | None]:
    """Preference pairs: the ranking metrics (`perplexity` or `preference`), and generations
    from each pair's prompt with its chosen response as the reference (a policy only)."""
    if "accuracy" in cfg.metrics:
        raise NanotuneError(
            "eval.metrics: accuracy needs format: classification data; for preference pairs "
            "use metrics: [preference] (how often chosen ranks above rejected)"
        )
    policy = hasattr(model, "hidden")
    if cfg.generation_metrics and not policy:
        raise NanotuneError(
            f"eval.metrics: {', '.join(cfg.generation_metrics)} need generated text, but a reward "
            "model generates none; use metrics: [preference]"
        )
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    metrics: dict[str, Any] = {}
    if "perplexity" in cfg.metrics or "preference" in cfg.metrics:
        batches = epoch_batches(
            examples, cfg.batch_size, 0, 0, task="preference", pad_id=pad_id, shuffle=False
        )
        metrics |= preference_eval(model, batches)
    gens = None
    if cfg.generation_metrics:
        prompted = [
            Example(e.prompt + e.chosen, [IGNORE] * len(e.prompt) + e.chosen) for e in examples
        ]
        gens = generate_for_eval(model, tokenizer, prompted, cfg)
        metrics |= generation_metrics(gens, cfg.generation_metrics)
    return metrics, gens


@dataclass
class BeforeAfter:
    """Metrics of the base and the fine-tuned model on the same examples, with samples."""

    before: dict[str, Any]
    after: dict[str, Any]
    samples: list[dict[str, str]] = field(default_factory=list)


def compare_models(
    before: tuple[dict[str, Any], Generations | None],
    after: tuple[dict[str, Any], Generations | None] | None,
    cfg: EvalConfig,
    reward: Any = None,
) -> BeforeAfter:
    """Two `evaluate_model` results (metrics, generations) as one comparison, with the `reward`
    metric (it scores both models' responses to the same prompts) and side-by-side samples.

    after: None compares nothing: the base model's metrics alone (`BeforeAfter.after` is empty).
    reward: anything with `score(prompts, responses, batch_size)`, by default a
        `RewardModel(cfg.reward_model)`.
    """
    (b, gens_b), (a, gens_a) = before, after or ({}, None)
    if gens_b is None or (after is not None and gens_a is None):
        return BeforeAfter(b, a)
    if "reward" in cfg.metrics:
        rm = reward or RewardModel(cfg.reward_model)
        if gens_a is None:
            scores = rm.score(gens_b.prompts, gens_b.outputs, cfg.batch_size)
            b = b | {"reward": sum(scores) / len(scores)}
        else:
            rb, ra = compare_rewards(
                rm, gens_b.prompts, gens_b.outputs, gens_a.outputs, cfg.batch_size
            )
            b, a = b | rb, a | ra
    return BeforeAfter(b, a, samples(gens_b, gens_a, cfg.num_samples))


def evaluate_before_after(
    model: nn.Module,
    tokenizer: Any,
    finetune: Callable[[nn.Module], nn.Module],
    examples: Sequence[Any],
    cfg: EvalConfig,
    *,
    task: Task,
    label_names: Sequence[str] | None = None,
    reward: Any = None,
) -> BeforeAfter:
    """Evaluate `model`, then `finetune(model)` (which may change it in place, e.g. load an
    adapter, or return another model), with the same config, examples and prompts.

    The `reward` metric scores both models' responses with `reward` (see `compare_models`), by
    default a `RewardModel(cfg.reward_model)` on the fine-tuned model's device.
    """
    given = dict(task=task, label_names=label_names)
    before = evaluate_model(model, tokenizer, examples, cfg, **given)
    tuned = finetune(model)
    after = evaluate_model(tuned, tokenizer, examples, cfg, **given)
    if reward is None and "reward" in cfg.metrics and after[1] is not None:
        reward = RewardModel(cfg.reward_model, device=next(tuned.parameters()).device)
    return compare_models(before, after, cfg, reward)

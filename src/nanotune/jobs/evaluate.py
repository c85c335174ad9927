"""`nanotune eval` as a function: load the base model, build the split, evaluate it, apply the
fine-tune, evaluate again."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanotune.data import DataConfig, build_datasets
from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.eval.evaluate import samples
from nanotune.eval.reward import RewardModel
from nanotune.eval.run import BeforeAfter, evaluate_before_after, evaluate_model
from nanotune.jobs import artifacts


def _grow_vocab(model: nn.Module, tokenizer: Any) -> None:
    # Chat markers the data added to the tokenizer need embedding rows (mean-initialised).
    body = getattr(model, "body", model)
    if tokenizer.vocab_size > body.config.vocab_size:
        body.resize_token_embeddings(tokenizer.vocab_size)


def evaluate_job(
    model_name: str,
    data: DataConfig,
    cfg: EvalConfig,
    *,
    adapter: str | None = None,
    finetuned: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, str]]]:
    """(base metrics, fine-tuned metrics or None, samples) on the `cfg.split` split of `data`.

    The fine-tune is a PEFT adapter folder (applied onto the base) or a full model folder. Both
    models see the same examples, tokenized once with the base tokenizer.
    """
    from nanotune.weights import load_model

    if adapter and finetuned:
        raise NanotuneError("give --adapter or --finetuned, not both")
    model, tokenizer = load_model(model_name)
    datasets = build_datasets(data, tokenizer)
    if cfg.split not in datasets.splits:
        raise NanotuneError(
            f"eval.split: {cfg.split!r} is not a split of this data (has {', '.join(datasets.splits)}); "
            "set data.val_fraction / val_source or choose another split"
        )
    examples = datasets.splits[cfg.split]
    _grow_vocab(model, tokenizer)
    if data.format == "classification":
        from nanotune.methods import SequenceClassifier

        if finetuned:
            raise NanotuneError(
                "a classifier's head is saved with its adapter: evaluate it with --adapter DIR"
            )
        names = datasets.label_names or []
        torch.manual_seed(cfg.seed)  # the untrained head of the base model is reproducible
        model = SequenceClassifier(model, len(names), names)
    model.eval()
    if not adapter and not finetuned:
        metrics, gens = evaluate_model(model, tokenizer, examples, cfg)
        if gens is None:
            return metrics, None, []
        if "reward" in cfg.metrics:
            rm = RewardModel(cfg.reward_model)
            scores = rm.score(gens.prompts, gens.outputs, cfg.batch_size)
            metrics["reward"] = sum(scores) / len(scores)
        return metrics, None, samples(gens, None, cfg.num_samples)

    def finetune(base: nn.Module) -> nn.Module:
        if adapter:
            return artifacts.apply_adapter(base, tokenizer, adapter)[0].eval()
        tuned, _ = artifacts.load(finetuned)
        _grow_vocab(tuned, tokenizer)
        return tuned.eval()

    result: BeforeAfter = evaluate_before_after(model, tokenizer, finetune, examples, cfg)
    return result.before, result.after, result.samples

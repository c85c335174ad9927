"""`nanotune eval` as a function: load the base model, build the split, evaluate it, apply the
fine-tune, evaluate again."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from nanotune.config import RunConfig, load_config
from nanotune.data import DataConfig, build_datasets
from nanotune.data.formats import FORMATS
from nanotune.errors import NanotuneError
from nanotune.eval import RunSummary, compare, write_report
from nanotune.eval.compare import metrics_table
from nanotune.eval.config import EvalConfig
from nanotune.eval.run import compare_models, evaluate_before_after, evaluate_model
from nanotune.jobs import artifacts
from nanotune.jobs.config import EvalCommand
from nanotune.jobs.prepare import prepare_model, reward_model
from nanotune.models import DEFAULT_MODEL


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
            f"eval.split: {cfg.split!r} is not a split of this data "
            f"(has {', '.join(datasets.splits)}); "
            "set data.val_fraction / val_source or choose another split"
        )
    if getattr(datasets.splits[cfg.split], "streamed", False):
        raise NanotuneError(
            f"eval.split: {cfg.split} is read as a stream (data.streaming); evaluate on a "
            "val_source or test_source"
        )
    if datasets.task == "classification" and finetuned:
        raise NanotuneError(
            "a classifier's head is saved with its adapter: evaluate it with --adapter DIR"
        )
    rewards = reward_model(cfg)
    examples = datasets.splits[cfg.split]
    model = prepare_model(model, tokenizer, datasets, seed=cfg.seed).eval()
    given = dict(task=datasets.task, label_names=datasets.label_names)
    if not adapter and not finetuned:
        base = evaluate_model(model, tokenizer, examples, cfg, **given)
        result = compare_models(base, None, cfg, rewards)
        return result.before, None, result.samples

    def finetune(base: nn.Module) -> nn.Module:
        if adapter:
            return artifacts.apply_adapter(base, tokenizer, adapter)[0].eval()
        tuned, _ = artifacts.load(finetuned)
        # The same preparation as the base: rows for the markers the data added.
        return prepare_model(tuned, tokenizer, datasets, seed=cfg.seed).eval()

    result = evaluate_before_after(
        model, tokenizer, finetune, examples, cfg, **given, reward=rewards
    )
    return result.before, result.after, result.samples


def eval_command(c: EvalCommand) -> int:
    """`nanotune eval`: the run's model, data and eval sections from --recipe (the flags
    override its eval section) or from --data and the flags; the table, samples and report."""
    flags = [f"eval.{k}={v}" for k, v in c.eval_section.items()]  # only to name them in errors
    if c.recipe:
        run = load_config(c.recipe, c.overrides)
        data = {**dataclasses.asdict(run.data), **c.data_section}
        section = {**dataclasses.asdict(run.eval), **c.eval_section}
        run = RunConfig.from_dict(
            {"model": run.model.name, "data": data, "eval": section},
            source=" ".join(flags) or None,
        )
    else:
        columns = dict(col.split("=", 1) for col in c.column)
        data = {"source": c.data, "columns": columns, **c.data_section}
        fmt = data.get("format", DataConfig.__dataclass_fields__["format"].default)
        section = {"metrics": list(FORMATS[fmt].metrics), "split": "train", **c.eval_section}
        run = RunConfig.from_dict(
            {"model": DEFAULT_MODEL, "data": data, "eval": section}, c.overrides
        )
    model, data, cfg = c.model or run.model.name, run.data, run.eval
    before, after, samples = evaluate_job(
        model, data, cfg, adapter=c.adapter, finetuned=c.finetuned
    )
    print(metrics_table(before) if after is None else compare(before, after, ("base", "finetuned")))
    for s in samples:
        print("\n" + "\n".join(f"[{k}] {v}" for k, v in s.items()))
    if c.report:
        config = {
            "model": model,
            "adapter": c.adapter,
            "finetuned": c.finetuned,
            "data": dataclasses.asdict(data),
            "eval": dataclasses.asdict(cfg),
        }
        title = "nanotune evaluation report"
        summary = RunSummary(config, before, after or {}, samples, title=title)
        print(f"\nreport: {write_report(c.report, summary)}")
    return 0

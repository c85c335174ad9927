"""One fine-tuning job, end to end: config → model → method → data → Trainer → final/.

Each step is a plain call into its part; this module only wires them and guards the run
directory (never overwritten by accident, resumed only with a compatible config).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nanotune.config import RunConfig, load_config
from nanotune.errors import NanotuneError

# What a resumed run must share with the original: the model, the method, the data and what
# fixes the data order; training knobs such as eval_every may change.
RESUME_KEYS = (
    "model",
    "method",
    "data",
    "train.seed",
    "train.micro_batch_size",
    "train.grad_accum",
)


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    """final/: a PEFT adapter folder (LoRA), an HF model folder (full, last_n) or a classifier."""
    step: int
    train_loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    stopped_early: bool = False
    before: dict[str, Any] = field(default_factory=dict)
    """The `eval:` metrics of the model before training, on `eval.split` (empty without it)."""
    after: dict[str, Any] = field(default_factory=dict)
    """The same metrics of the fine-tuned model, on the same examples."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """Prompt, reference, before and after generations of the first examples."""
    report: Path | None = None
    """report.html in the run directory, when there was a split to evaluate."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _check_resumable(run_dir: Path, config: RunConfig) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise NanotuneError(f"{run_dir}: no config.yaml to resume from; start without --resume")
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(config.to_dict())
    differ = sorted(
        k
        for k in set(old) | set(new)
        if any(k == p or k.startswith(p + ".") for p in RESUME_KEYS) and old.get(k) != new.get(k)
    )
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ[:4])
        raise NanotuneError(
            f"{run_dir}: cannot resume, the config differs in {shown}; restore those values or "
            "start a new run (--overwrite or another output_dir)"
        )


def prepare_run_dir(config: RunConfig, *, resume: bool, overwrite: bool) -> Path:
    """The run directory, checked: refuse an existing one unless resuming (compatibly) or
    overwriting. Nothing is deleted before every check has passed."""
    run_dir = Path(config.output_dir)
    exists = run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))
    if resume and overwrite:
        raise NanotuneError("--resume and --overwrite exclude each other; choose one")
    if resume:
        if not exists:
            raise NanotuneError(f"{run_dir}: nothing to resume; start without --resume")
        _check_resumable(run_dir, config)
    elif exists:
        if not overwrite:
            raise NanotuneError(
                f"{run_dir} already exists; pass --resume to continue it, --overwrite to start "
                "over, or set output_dir to a new folder"
            )
        if not run_dir.is_dir():
            raise NanotuneError(f"{run_dir} exists and is not a folder; choose another output_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _save_final(model: Any, tokenizer: Any, config: RunConfig, final: Path) -> None:
    from nanotune.methods import SequenceClassifier, lora_layers, merge
    from nanotune.methods.classifier import save_classifier
    from nanotune.train.checkpoint import atomic_dir
    from nanotune.weights import save_model
    from nanotune.weights.peft import save_adapter

    if isinstance(model, SequenceClassifier):
        base = config.model.name if lora_layers(model.body) else None
        save_classifier(model, final, tokenizer, base, overwrite=True)
        return
    if lora_layers(model) and not model.wte.weight.requires_grad:

        def write(tmp: Path) -> None:
            save_adapter(model, tmp, config.model.name)
            tokenizer.save(tmp)

        atomic_dir(final, write)
        return
    # Full and last_n runs, and LoRA that also trained the embeddings (no adapter can hold
    # those): a whole HF model. The run is over, so adapters are folded in place: a copy would
    # double the memory, and torchao re-quantizes copied NF4 weights with a scaler block that
    # small layers do not divide.
    body = merge(model) if lora_layers(model) else model
    save_model(body, tokenizer, final, overwrite=True)


def _evaluate(model: Any, tokenizer: Any, examples: list, config: RunConfig, labels: Any) -> tuple:
    from nanotune.eval import evaluate_model

    if not examples:
        return {}, None
    return evaluate_model(model, tokenizer, examples, config.eval, labels)


def _write_results(
    run_dir: Path, config: RunConfig, before: tuple, after: tuple, data_stats: dict
) -> tuple[dict, dict, list, Path]:
    """Score rewards (they compare two sets of responses), then write eval.json and report.html."""
    import json

    from nanotune.eval import RewardModel, compare, compare_rewards, samples, write_report
    from nanotune.eval.report import RunSummary

    (b, gens_b), (a, gens_a) = before, after
    shown: list[dict[str, str]] = []
    if gens_b is not None and gens_a is not None:
        if "reward" in config.eval.metrics:
            rb, ra = compare_rewards(
                RewardModel(config.eval.reward_model),
                gens_b.prompts,
                gens_b.outputs,
                gens_a.outputs,
                config.eval.batch_size,
            )
            b, a = b | rb, a | ra
        shown = samples(gens_b, gens_a, config.eval.num_samples)
    results = {"split": config.eval.split, "before": b, "after": a, "samples": shown}
    tmp = run_dir / ".eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(run_dir / "eval.json")
    summary = RunSummary(config.to_dict(), b, a, shown, run_dir / "metrics.jsonl", data_stats)
    report = write_report(run_dir, summary)
    print(f"\n{config.eval.split} split, before and after fine-tuning:\n{compare(b, a)}")
    return b, a, shown, report


def train(
    config: RunConfig | str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] = (),
    progress: bool = True,
) -> RunResult:
    """Run one fine-tuning job and write its run directory; see docs/design.md for the parts.

    config: a RunConfig, a YAML path or a packaged recipe name (`overrides` apply to the last
        two, e.g. ["train.lr=1e-4"]).
    resume: continue the run in `output_dir` from its latest checkpoint (same model/method/data).
    overwrite: delete an existing `output_dir` and start over.

    Under torchrun every process runs this with the same arguments (see docs/distributed.md);
    rank 0 alone writes the run directory.
    """
    from nanotune.train import dist

    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    with dist.session(config.train.device, config.train.dist_timeout):
        return _train(config, resume=resume, overwrite=overwrite, progress=progress)


def _train(config: RunConfig, *, resume: bool, overwrite: bool, progress: bool) -> RunResult:
    from nanotune.data.batching import epoch_batches
    from nanotune.data.pipeline import build_datasets
    from nanotune.methods import SequenceClassifier, apply_method
    from nanotune.train import Trainer, dist, seed_everything
    from nanotune.train.dist import is_main, on_main, world_size
    from nanotune.weights import load_model

    # Rank 0 alone checks and creates the run directory; its refusal stops every rank.
    run_dir = on_main(lambda: prepare_run_dir(config, resume=resume, overwrite=overwrite))
    tc = config.train
    seed_everything(tc.seed)  # model init (LoRA A, heads) depends on it
    try:
        model, tokenizer = load_model(config.model.name, dtype=getattr(torch, config.model.dtype))
    except NanotuneError as e:  # its hint names the CLI flag; a run config sets model=
        raise NanotuneError(f"{e}; in a run config: model=./folder") from e
    if config.model.special_tokens:
        tokenizer.add_special_tokens(config.model.special_tokens)
    data = build_datasets(config.data, tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)
        if not config.method.train_embeddings and config.method.name != "full":
            print(
                f"note: {tokenizer.vocab_size - model.config.vocab_size} tokens were added but "
                "their embeddings stay at their initial value; set method.train_embeddings: "
                "true to learn them"
            )
    if data.label_names is not None:
        model = SequenceClassifier(model, len(data.label_names), data.label_names)
    model = apply_method(model, config.method)
    if is_main():
        config.save(run_dir / "config.yaml")
        print(data.summary())
    # The recipe's metrics before training, and after it on the same examples (every rank
    # evaluates, so none waits alone in a collective; rank 0 writes the results).
    examples = data.splits.get(config.eval.split, [])
    if not examples and is_main():
        print(f"note: no {config.eval.split!r} split, so no before/after evaluation (eval.split)")
    model.to(dist.device_for(tc.device))
    before = _evaluate(model, tokenizer, examples, config, data.label_names)

    batching = dict(
        pad_id=tokenizer.pad_id, pack=config.data.pack, max_length=config.data.max_length
    )

    def train_batches(epoch: int) -> list[dict]:
        return epoch_batches(
            data.train,
            tc.batch_size * world_size(),  # the global batch; each rank takes its rows
            tc.seed,
            epoch,
            group_by_length=config.data.group_by_length,
            **batching,
        )

    val = (
        epoch_batches(
            data.val, tc.micro_batch_size * world_size(), tc.seed, 0, shuffle=False, **batching
        )
        if data.val
        else []
    )
    trainer = Trainer(
        model,
        tc,
        train_batches,
        run_dir,
        val_batches=val,
        resolved_config=config.to_dict(),
        progress=progress,
    )
    result = trainer.fit(resume=resume)
    final = run_dir / "final"
    # Every rank runs the same passes, through the engine's forward as the trainer's own
    # evaluation does (DDP and FSDP2 act there), without gradients.
    with torch.no_grad():
        after = trainer.engine(
            lambda m, _: _evaluate(m, tokenizer, examples, config, data.label_names), None
        )
    dist.reshard(trainer.engine)
    with trainer.full_model() as trained:  # FSDP2: whole weights on rank 0 while saving
        on_main(lambda: _save_final(trained, tokenizer, config, final))
    evaluated = (
        on_main(lambda: _write_results(run_dir, config, before, after, data.stats))
        if examples
        else ({}, {}, [], None)
    )
    return RunResult(
        run_dir=run_dir,
        final_dir=final,
        step=result.step,
        train_loss=result.train_loss,
        eval=result.eval,
        best_step=result.best_step,
        stopped_early=result.stopped_early,
        before=evaluated[0],
        after=evaluated[1],
        samples=evaluated[2],
        report=evaluated[3],
    )

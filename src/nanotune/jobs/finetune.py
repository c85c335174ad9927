"""One fine-tuning job, end to end: config → model → method → data → Trainer → final/.

Each step is a plain call into its part; this module only wires them and guards the run
directory (never overwritten by accident, resumed only with a compatible config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from nanotune.config import RunConfig, load_config
from nanotune.errors import NanotuneError, OfflineError
from nanotune.files.atomic import RunDir, atomic_write, check_target
from nanotune.files.read import read_text
from nanotune.jobs import artifacts
from nanotune.jobs.config import TrainCommand

if TYPE_CHECKING:
    from nanotune.data import DataConfig, Datasets
    from nanotune.tokenizer import Tokenizer

# What a resumed run must share with the original: the model, the method, the data, what fixes
# the data order and the schedule's length; training knobs such as eval_every may change.
RESUME_KEYS = (
    "model",
    "method",
    "data",
    "preference",
    "train.seed",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.epochs",
    "train.max_steps",
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
    fix = "restore it from a copy, or start a new run (--overwrite or another output_dir)"
    try:
        old = yaml.safe_load(read_text(saved, "the run's config", fix))
    except yaml.YAMLError as e:
        raise NanotuneError(f"{saved}: not valid YAML, so the run cannot resume; {fix}") from e
    if not isinstance(old, dict):
        raise NanotuneError(f"{saved}: not a run config, so the run cannot resume; {fix}")
    try:  # read as a config today reads it: renamed keys and new defaults compare equal
        old = _flatten(RunConfig.from_dict(old, source=saved).to_dict())
    except NanotuneError as e:
        raise NanotuneError(f"cannot resume: {e}") from e
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


# Everything a run writes at the top of its directory: `--overwrite` replaces a run directory
# only when it holds nothing else.
RUN_ENTRIES = (
    "wandb",  # train.report_to: [wandb] logs inside the run
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "final",
    "eval.json",
    "report.html",
    "tensorboard",
    "reference_logps.safetensors",  # DPO without LoRA: the reference policy's log-probs
)


def run_inputs(config: RunConfig, config_path: str | Path | None = None) -> list[Path]:
    """The local files and folders a run reads: an overwrite must never remove one of them."""
    from nanotune.data.sources import PYTHON

    candidates = [config_path, config.model.name, config.eval.reward_model]
    mixed = [s.source for s in config.data.sources]
    for spec in (config.data.source, *mixed, config.data.val_source, config.data.test_source):
        if spec and not spec.startswith(PYTHON):  # rows handed to train(data=...), no path
            candidates += [spec, spec.rsplit(":", 1)[0]]  # `folder:split` names a saved dataset
    found = []
    for c in candidates:
        if c and Path(c).expanduser().exists():
            found.append(Path(c).expanduser())
    return found


def check_run_dir(
    config: RunConfig, *, resume: bool, overwrite: bool, inputs: list[Path] = ()
) -> None:
    """Refuse a run directory that cannot be used, before anything slow happens; writes nothing."""
    run_dir = Path(config.output_dir).expanduser()
    if resume and overwrite:
        raise NanotuneError("--resume and --overwrite exclude each other; choose one")
    if resume:
        if not run_dir.is_dir() or not any(run_dir.iterdir()):
            raise NanotuneError(f"{run_dir}: nothing to resume; start without --resume")
        _check_resumable(run_dir, config)
        return
    try:
        check_target(run_dir, overwrite=overwrite, inputs=inputs, what="output_dir")
    except NanotuneError as e:
        if overwrite or not run_dir.is_dir():
            raise
        raise NanotuneError(
            f"{run_dir} already exists; pass --resume to continue it, --overwrite to start "
            "over, or set output_dir to a new folder"
        ) from e


def _evaluate(model: Any, tokenizer: Any, examples: list, config: RunConfig, data: Any) -> tuple:
    from nanotune.eval import evaluate_model

    if not examples:
        return {}, None
    return evaluate_model(
        model, tokenizer, examples, config.eval, task=data.task, label_names=data.label_names
    )


def _write_results(
    run_dir: Path,
    config: RunConfig,
    before: tuple,
    after: tuple,
    reward_model: Any,
    data_stats: dict,
    data_sources: list[dict] = (),
) -> tuple[dict, dict, list, Path]:
    """Compare the two evaluations (rewards score both sets of responses), then write eval.json
    and report.html."""
    import json

    from nanotune.eval import compare, compare_models, write_report
    from nanotune.eval.report import RunSummary

    result = compare_models(before, after, config.eval, reward_model)
    b, a, shown = result.before, result.after, result.samples
    results = {"split": config.eval.split, "before": b, "after": a, "samples": shown}
    atomic_write(run_dir / "eval.json", json.dumps(results, indent=1, default=str))
    summary = RunSummary(
        config.to_dict(), b, a, shown, run_dir / "metrics.jsonl", data_stats, list(data_sources)
    )
    report = write_report(run_dir, summary)
    print(f"\n{config.eval.split} split, before and after fine-tuning:\n{compare(b, a)}")
    return b, a, shown, report


def train(
    config: RunConfig | dict[str, Any] | str | Path,
    *,
    data: dict[str, Any] | None = None,
    rewards: Sequence[Callable[..., Any]] = (),
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] = (),
    progress: bool = True,
) -> RunResult:
    """Run one fine-tuning job and write its run directory; see docs/design.md for the parts.

    config: a RunConfig, a recipe mapping (`RunConfig.from_dict`), a YAML path or a packaged
        recipe name (`overrides` apply to all but the first, e.g. ["train.lr=1e-4"]).
    data: rows given in Python, by split ("train", and "val"/"eval" or "test"): each a list of
        dicts, a `datasets.Dataset` or a pandas DataFrame. They replace the config's sources of
        those splits, are read as a file's rows are (a bad row is named `data["train"][3]`),
        and are not kept in the data cache. A `datasets.IterableDataset` is read whole too,
        unless `data.streaming: true`: then it is tokenized as training reads it.
    rewards: reward functions for `rl.algorithm: grpo`, besides those of `rl.rewards`:
        fn(completions, prompts=, reference=, completion_ids=) -> one float per completion.
    resume: continue the run in `output_dir` from its latest checkpoint (same model/method/data).
    overwrite: replace an existing `output_dir` that nanotune wrote; the old run is removed only
        once the new one has a checkpoint, and never a folder holding user files or inputs.

    Under torchrun every process runs this with the same arguments (see docs/distributed.md);
    rank 0 alone writes the run directory.
    """
    from nanotune.data.sources import PYTHON, PYTHON_SPLITS, python_sources
    from nanotune.training import dist

    objects = {} if data is None else python_sources(data)
    # The config names each given split's rows by a source string that stands for them.
    given = [f"data.{PYTHON_SPLITS[k.removeprefix(PYTHON)]}={k}" for k in objects]
    path = config if isinstance(config, (str, Path)) else None
    if isinstance(config, RunConfig):
        config = RunConfig.from_dict(config.to_dict(), given) if given else config
    elif isinstance(config, dict):
        config = RunConfig.from_dict(config, [*given, *overrides])
    else:
        config = load_config(config, [*given, *overrides])
    recipe = path if path is not None and not Path(path).is_file() else None
    inputs = run_inputs(config, path if recipe is None else None)
    try:
        with dist.session(config.train.device, config.train.dist_timeout):
            return _train(
                config,
                resume=resume,
                overwrite=overwrite,
                progress=progress,
                inputs=inputs,
                objects=objects,
                rewards=rewards,
            )
    except OfflineError as e:
        raise OfflineError(e.reason, _offline_fix(recipe)) from e


def _offline_fix(recipe: str | Path | None) -> str:
    """How to run the same job from local files, in `nanotune train` syntax."""
    from nanotune.recipes import recipe_offline_line

    line = recipe_offline_line(str(recipe)) if recipe is not None else None
    line = line or "nanotune train CONFIG model=./model-folder data.source=./data.jsonl"
    return (
        f"run it from local files: {line} (a local GPT-2 folder: `nanotune export --model gpt2 "
        "./gpt2-folder` once where the hub is reachable; see the README's Offline section)"
    )


def _train(
    config: RunConfig,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    inputs: list[Path],
    objects: dict[str, Any],
    rewards: Sequence[Callable[..., Any]] = (),
) -> RunResult:
    from nanotune.training.dist import is_main, on_main

    # Every check and every input first (the run directory, model, data, method, reward
    # model): a run that cannot start writes nothing and removes nothing.
    on_main(lambda: check_run_dir(config, resume=resume, overwrite=overwrite, inputs=inputs))
    setup = _setup(config, objects, rewards)
    run = RunDir(config.output_dir, RUN_ENTRIES)
    if resume:
        run_dir = run.path
    else:
        run_dir = on_main(lambda: run.open(overwrite=overwrite, inputs=inputs))
    try:
        result = _fit(config, setup, run_dir, resume=resume, progress=progress)
    except BaseException:
        # A new run that has nothing to resume from is removed again, and the run it was to
        # replace is put back; one with a checkpoint stays, to be resumed.
        if is_main() and not resume:
            from nanotune.training.checkpoint import latest_checkpoint

            run.close(keep_new=latest_checkpoint(run_dir / "checkpoints") is not None)
        raise
    if is_main() and not resume:
        run.close(keep_new=True)
    return result


@dataclass
class _Setup:
    """What a run needs before its directory exists: all of it checked and loaded."""

    model: Any
    tokenizer: Any
    data: Any
    reward_model: Any
    rl_rewards: Any = None  # GRPO's reward functions (training.grpo.Reward)


def _setup(
    config: RunConfig,
    objects: dict[str, Any] | None = None,
    rl_functions: Sequence[Callable[..., Any]] = (),
) -> _Setup:
    from nanotune.jobs.prepare import prepare_model, reward_model, reward_model_folder
    from nanotune.methods import apply_method
    from nanotune.training import seed_everything
    from nanotune.weights import load_model

    if config.data.streaming:
        _check_streaming(config)
    if config.train.push_to_hub:  # no token or offline: refused now, not after training
        artifacts.check_push(config.train.push_to_hub)
    if "reward" in config.eval.metrics:  # a reward run not trained yet: said before the loads
        reward_model_folder(config.eval.reward_model)
    rl_rewards = None
    if config.rl.algorithm:  # reward files and models load (and fail) before the model does
        from nanotune.jobs import grpo

        rl_rewards = grpo.rewards(config, rl_functions)
    elif rl_functions:
        raise NanotuneError(
            "rewards=[...] score sampled completions, but rl.algorithm is not set; set "
            "rl.algorithm: grpo or leave rewards out"
        )
    seed_everything(config.train.seed)  # model init (LoRA A, heads) depends on it
    model, tokenizer = load_model(config.model.name, dtype=getattr(torch, config.model.dtype))
    if config.model.special_tokens:
        tokenizer.add_special_tokens(config.model.special_tokens)
    data = _datasets(config.data, tokenizer, objects or {})
    model = prepare_model(
        model,
        tokenizer,
        data,
        seed=config.train.seed,
        method=config.method,
        reward=config.preference.objective == "reward",
    )
    model = apply_method(model, config.method)
    _check_trainable(model, data, config)
    if config.rl.algorithm:
        from nanotune.jobs import grpo

        grpo.check(config, model)
    if config.preference.objective == "reward":
        _score_before_the_end(data, tokenizer)
    rewards = reward_model(config.eval) if data.splits.get(config.eval.split) else None
    return _Setup(model, tokenizer, data, rewards, rl_rewards)


def _check_streaming(config: RunConfig) -> None:
    """What a streamed training set cannot do, refused before anything loads."""
    if not config.train.max_steps:
        raise NanotuneError(
            "data.streaming: a stream has no known length, so the run needs train.max_steps "
            "(the stream starts again when it ends)"
        )
    if config.rl.algorithm:
        raise NanotuneError("data.streaming: GRPO samples from every prompt; not with a stream")
    if config.eval.split == "train":
        raise NanotuneError("eval.split: train is streamed; evaluate on val or test")


def _datasets(cfg: DataConfig, tokenizer: Tokenizer, objects: dict[str, Any]) -> Datasets:
    """The splits, on every rank. Distributed, rank 0 tokenizes and writes the data cache
    while the others wait; they then map its entry, so the tokens are made once and held once
    (in the page cache, shared by every rank's memory map). Data the cache does not keep
    (hub datasets, classification, the cache off on rank 0) is built by every rank at once."""
    from nanotune.data import cache
    from nanotune.data.pipeline import build_datasets
    from nanotune.training import dist

    # Rank 0 decides for all: ranks that disagreed would pair up different collectives.
    if dist.world_size() == 1 or not dist.on_main(lambda: cache.cacheable(cfg, tokenizer)):
        return build_datasets(cfg, tokenizer, objects)
    data = dist.main_first(lambda: build_datasets(cfg, tokenizer, objects))
    if data is None:
        data = build_datasets(cfg, tokenizer, objects)
    mapped = dist.gather_objects(data.cached is not None)[1:]
    if dist.is_main():
        print(f"data: tokenized on rank 0; {sum(mapped)} of {len(mapped)} other rank(s) mapped it")
    return data


def _score_before_the_end(data: Any, tokenizer: Any) -> None:
    """A reward model scores the last token of each sequence, and it is scored where it will be
    used: transformers' sequence classifiers read the last token that is not padding (the pad
    is often EOS), and `eval.reward_model` scores generated replies, whose stop token (EOS, an
    end of turn) is not in their text. So the special token that closes both responses of a
    pair is dropped, and the score is read at the reply's last token of text."""
    special = {*tokenizer.special_tokens.values(), tokenizer.eos_id, tokenizer.pad_id}
    for examples in data.splits.values():
        for ex in examples:
            end = ex.chosen[-1:]
            if end and end == ex.rejected[-1:] and end[0] in special:
                ex.chosen, ex.rejected = ex.chosen[:-1], ex.rejected[:-1]


def _check_trainable(model: Any, data: Any, config: RunConfig) -> None:
    """What the trainer would refuse, refused before the run directory exists."""
    from nanotune.training import check_trainable

    if not data.train:
        raise NanotuneError(
            "the training split is empty; check data.source, data.limit and the held-out "
            "fractions (data.val_fraction, data.test_fraction)"
        )
    check_trainable(model, config.train)


def dry_run(config: RunConfig) -> None:
    """Load model, tokenizer, data and method as `train` would; print the data counts and the
    trainable parameters. Trains nothing and writes nothing (`nanotune train --dry-run`)."""
    from nanotune.methods import trainable_report

    setup = _setup(config)
    print(setup.data.summary())
    print(trainable_report(setup.model))


def _objective(config: RunConfig, model: Any, task: str) -> Any:
    """The trainer's objective for the data's task; preference pairs train what
    `preference.objective` says, DPO against the adapters-off base when only LoRA trains."""
    from nanotune.training import PreferenceObjective, objective_for

    if task != "preference":
        return objective_for(task)
    from nanotune.jobs.reference import reference_context

    pref = config.preference
    name = pref.resolved_objective()
    return PreferenceObjective(
        name,
        beta=pref.resolved_beta(),
        loss=pref.loss,
        label_smoothing=pref.label_smoothing,
        gamma=pref.simpo_gamma,
        lam=pref.orpo_lambda,
        reference=reference_context(model) if name == "dpo" else None,
    )


def _reference_logps(
    config: RunConfig, model: Any, tokenizer: Any, data: Any, run_dir: Path, *, resume: bool
) -> None:
    """DPO with no adapters to switch off: the reference log-probs of every train and val pair,
    computed once from the untrained model and stored in the run. A resumed run reads them
    back, so it trains against exactly the same values (without the file it computes them
    again: the checkpoint's weights are loaded later, so the model here is still untrained)."""
    from nanotune.jobs.reference import (
        REFERENCE_FILE,
        attach_reference,
        load_reference,
        save_reference,
    )
    from nanotune.training import autocast_for
    from nanotune.training.dist import device_for, on_main

    path = run_dir / REFERENCE_FILE
    splits = {"train": data.train, "val": data.val}
    if resume and path.is_file():
        load_reference(path, splits)
        return
    device = device_for(config.train.device)
    stored = attach_reference(
        model,
        splits,
        batch_size=config.train.micro_batch_size,
        pad_id=tokenizer.pad_id,
        device=device,
        autocast=autocast_for(config.train, device),  # the precision the policy trains in
    )
    on_main(lambda: save_reference(path, stored))


def _fit(config: RunConfig, setup: _Setup, run_dir: Path, *, resume: bool, progress: bool):
    from nanotune.data.batching import epoch_batches
    from nanotune.data.mix import epoch_examples
    from nanotune.methods import trainable_report
    from nanotune.training import Trainer, dist
    from nanotune.training.dist import is_main, on_main, world_size

    tc = config.train
    model, tokenizer, data = setup.model, setup.tokenizer, setup.data
    if is_main():
        config.save(run_dir / "config.yaml")
        print(data.summary())
        print(trainable_report(model))
    # The recipe's metrics before training, and after it on the same examples (every rank
    # evaluates, so none waits alone in a collective; rank 0 writes the results).
    examples = data.splits.get(config.eval.split, [])
    if not examples and is_main():
        print(f"note: no {config.eval.split!r} split, so no before/after evaluation (eval.split)")
    model.to(dist.device_for(tc.device))
    before = _evaluate(model, tokenizer, examples, config, data)
    rl_heldout: list = []
    if config.rl.algorithm:  # the held-out prompts' mean reward joins the eval metrics
        from nanotune.jobs import grpo

        # The examples the generation metrics use (eval.max_examples of the split).
        heldout = examples[: config.eval.max_examples]
        rl_heldout = grpo.prompts_of(heldout, tokenizer, config.eval.split)
        scored = grpo.heldout_reward(
            model, tokenizer, rl_heldout, setup.rl_rewards, config.rl.max_new_tokens
        )
        before = ({**before[0], **scored}, *before[1:]) if before else (scored, None)
        prompts = grpo.prompts_of(data.train, tokenizer, "train")
        objective = grpo.objective(config, model, tokenizer, prompts, setup.rl_rewards)
    else:
        objective = _objective(config, model, data.task)
    if getattr(objective, "needs_ref_logps", False):
        _reference_logps(config, model, tokenizer, data, run_dir, resume=resume)

    batching = dict(
        task=data.task,
        pad_id=tokenizer.pad_id,
        pack=config.data.pack,
        max_length=config.data.max_length,
    )

    if getattr(data.train, "streamed", False):  # data.streaming: max_steps batches, one "epoch"
        streamed = data.train.batches(
            tc.batch_size * world_size(),
            tc.seed,
            tc.max_steps,
            shuffle_buffer=config.data.shuffle_buffer,
            **{k: v for k, v in batching.items() if k != "task"},
        )

    def lm_batches(epoch: int) -> Sequence[dict]:
        if getattr(data.train, "streamed", False):
            return streamed
        return epoch_batches(
            epoch_examples(data.train, data.sources, tc.seed, epoch),  # data.sources' draw
            tc.batch_size * world_size(),  # the global batch; each rank takes its rows
            tc.seed,
            epoch,
            group_by_length=config.data.group_by_length,
            **batching,
        )

    train_batches = lm_batches
    if config.rl.algorithm:
        train_batches = grpo.prompt_batches(config, len(prompts))
    val = (
        epoch_batches(
            data.val, tc.micro_batch_size * world_size(), tc.seed, 0, shuffle=False, **batching
        )
        if data.val and not config.rl.algorithm  # GRPO has no validation loss
        else []
    )
    trainer = Trainer(
        model,
        tc,
        train_batches,
        run_dir,
        val_batches=val,
        objective=objective,
        resolved_config=config.to_dict(),
        progress=progress,
    )
    result = trainer.fit(resume=resume)
    final = run_dir / "final"
    # Every rank runs the same passes, through the engine's forward as the trainer's own
    # evaluation does (DDP and FSDP2 act there), without gradients.
    with torch.no_grad():
        after = trainer.engine(lambda m, _: _evaluate(m, tokenizer, examples, config, data), None)
        if config.rl.algorithm:
            scored = grpo.heldout_reward(
                model, tokenizer, rl_heldout, setup.rl_rewards, config.rl.max_new_tokens
            )
            after = ({**after[0], **scored}, *after[1:]) if after else (scored, None)
    dist.reshard(trainer.engine)
    mixed = data.train.parts() if getattr(data.train, "streamed", False) else data.sources
    sources = [p.to_dict() for p in mixed]
    with trainer.full_model() as trained:  # FSDP2: whole weights on rank 0 while saving
        on_main(
            lambda: artifacts.save_final(
                trained,
                tokenizer,
                config,
                final,
                before=before[0],
                after=after[0],
                data_stats=data.stats,
                data_sources=sources,
            )
        )
    if config.train.push_to_hub:
        on_main(lambda: artifacts.push(final, config.train.push_to_hub))
    evaluated = (
        on_main(
            lambda: _write_results(
                run_dir, config, before, after, setup.reward_model, data.stats, sources
            )
        )
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


def train_command(c: TrainCommand) -> int:
    """`nanotune train`: --print-config and --dry-run stop before training; under torchrun every
    rank trains and rank 0 reports."""
    if c.print_config or c.dry_run:
        resolved = load_config(c.config, c.overrides)
        if c.print_config:
            print(resolved.to_yaml(), end="")
        else:
            dry_run(resolved)
        return 0
    from nanotune.training.dist import is_main

    result = train(c.config, overrides=c.overrides, resume=c.resume, overwrite=c.overwrite)
    if is_main():  # under torchrun every rank returns here; one report is enough
        print(f"done: {result.step} steps; final model in {result.final_dir}")
        if result.report:
            print(f"report: {result.report}")
    return 0

"""The training loop: accumulation, schedule, evaluation, early stopping, checkpoints, resume.

The trainer sees a model, an objective and batches in the contract of docs/design.md; it knows
no model family and no prompt format.

A resumable checkpoint (`checkpoints/step-N`) is written at the end of every epoch, every
`save_every` steps, at the end of training and when SIGINT or SIGTERM stops the run, so
`--resume` always has a recent state to continue from.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.training import checkpoint as ckpt
from nanotune.training import dist
from nanotune.training.compiled import CompiledBlocks
from nanotune.training.config import TrainConfig
from nanotune.training.dist import all_reduce_sum, barrier, is_main, rank_rows, world_size
from nanotune.training.logger import RunLogger
from nanotune.training.losses import (
    Batch,
    ClassificationObjective,
    LMObjective,
    Objective,
    trim_padding,
)
from nanotune.training.precision import autocast_for, compute_precision, grad_scaler_for
from nanotune.training.prefix import PrefixStore, available_memory
from nanotune.training.schedule import lr_at

BatchesForEpoch = Callable[[int], Sequence[Batch]]
"""epoch -> that epoch's global batches (each `TrainConfig.batch_size` rows or fewer), in order.

Must be a pure function of the epoch (and the seed it was built with) so a resumed run sees
the same batches; it must not draw from the global RNGs.
"""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): model init and dropout become reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over trainable parameters: no decay on 1-D tensors (norms, biases) or
    embeddings (a tied LM head shares the embedding's tensor and is covered by it)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def check_trainable(model: nn.Module, config: TrainConfig) -> list[nn.Module]:
    """What training `model` with `config` would refuse (the device, nothing trainable, no
    gradient checkpointing), raised without training: a job calls it before it writes anything.
    Returns the modules that gradient checkpointing switches (none when it is off)."""
    dist.device_for(config.device)
    if not param_groups(model, config.weight_decay):
        raise NanotuneError(
            "model has no trainable parameters; check the method section "
            "(e.g. method.name: lora) of the config"
        )
    if not config.gradient_checkpointing:
        return []
    modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not modules:
        raise NanotuneError("train.gradient_checkpointing: this model does not support it")
    return modules


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    check_trainable(model, config)
    groups = param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps)
    # The fused kernel is ~50x faster than foreach on this CPU and the fastest on CUDA; it
    # refuses some tensor types (e.g. quantized subclasses), so fall back to the default.
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied tensor counts once."""
    total = trainable = 0
    for p in model.parameters():  # parameters() visits a tied tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


RESUME_HINT = "continue with: nanotune train CONFIG --resume"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; the message says what was saved and how to resume.

    A KeyboardInterrupt, so `except Exception` does not swallow a request to stop.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class _StopSignals:
    """While entered (on the main thread only: Python allows handlers nowhere else), the first
    SIGINT or SIGTERM sets `signum` for the loop to stop after the current step; a second one
    raises Interrupted at once. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set in C

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # Checkpoints are renamed into place whole, so stopping mid-write loses only it.
            raise Interrupted(
                signum,
                f"stopped at once by a second {name}; the checkpoints written before are "
                f"intact; {RESUME_HINT}",
            )
        self.signum = signum
        if is_main():  # os.write: print() may be inside a write to the same stream right now
            os.write(
                2, f"\n{name}: stopping after this step ({name} again stops at once)\n".encode()
            )


@dataclass
class _Position:
    """Where the loop is; stored in every checkpoint's state."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    """Next batch of `epoch` to train on."""
    best: dict[str, Any] = field(default_factory=lambda: {"step": None, "eval": {}, "bad_evals": 0})
    evaluated_at: int | None = None
    stopped_early: bool = False


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done."""
    train_loss: float | None
    """Loss per label of the last step."""
    eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation (of the restored best weights when `keep_best`)."""
    best_step: int | None = None
    best_eval: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


class Trainer:
    """Train `model` on `train_batches` with `config`, writing metrics and checkpoints to run_dir.

    objective: loss/count/metrics for the batches (`objective_for(task)`); language modelling
        when None.
    val_batches: fixed validation batches (any size; split into micro-batches here).
    resolved_config: the full run config, stored in every checkpoint.

    Under torch.distributed (a process group set up, e.g. by `dist.session`) the model is
    wrapped per `config.strategy` (DDP or FSDP2); every rank must construct the Trainer and call
    `fit` with the same arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: BatchesForEpoch,
        run_dir: str | Path,
        *,
        val_batches: Sequence[Batch] = (),
        objective: Objective | None = None,
        resolved_config: dict | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.device = dist.device_for(config.device)
        self.model = model.to(self.device)
        self.train_batches = train_batches
        self.val_batches = list(val_batches)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resolved_config = resolved_config
        self.progress = progress
        self._epoch_cache: tuple[int, Sequence[Batch]] | None = None
        first = self._epoch(0)
        if not first:
            raise NanotuneError("the training set gave no batches; check data.source and limits")
        self.objective = objective or LMObjective()
        self.steps_per_epoch = len(first)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.autocast = self._autocast()
        # An objective with `loss_and_sums` gives, from the forward of its loss, sums to log
        # per step (preference metrics); every other objective runs its plain `loss_sum`.
        self.step_sums = hasattr(self.objective, "loss_and_sums")
        self.loss_fn = self.objective.loss_and_sums if self.step_sums else self.objective.loss_sum
        for m in check_trainable(model, config):
            m.gradient_checkpointing = True
        precision = compute_precision(config, self.device)[0]
        self.compiled = CompiledBlocks(self.model, config.compile, self.device, precision)
        # A classifier's body keeps an LM head that takes no part in its loss.
        unused = isinstance(self.objective, ClassificationObjective) or getattr(
            self.objective, "scores_sequences", False
        )
        self.engine = dist.wrap(self.model, config.strategy, self.device, find_unused=unused)
        # After wrapping: FSDP2 replaces the parameters with sharded ones.
        self.optimizer = build_optimizer(self.model, config)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # float16 autocast only (a disabled scaler passes everything through unchanged).
        self.scaler = grad_scaler_for(config, self.device, self.params)

    @contextlib.contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The model with whole parameters (FSDP2 shards gathered); every rank must enter."""
        with dist.full_params(self.engine):
            yield self.model

    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        return autocast_for(self.config, self.device)

    def _epoch(self, epoch: int) -> Sequence[Batch]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.train_batches(epoch))
        return self._epoch_cache[1]

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        """This rank's rows of each global micro-batch (`micro_batch_size * world_size` rows)."""
        rows = self.config.micro_batch_size * world_size()
        n = len(batch["input_ids"])
        out = []
        for lo in range(0, n, rows):
            part = {k: v[lo : lo + rows] for k, v in batch.items() if isinstance(v, Tensor)}
            part = trim_padding(rank_rows(part))
            out.append({k: v.to(self.device, non_blocking=True) for k, v in part.items()})
        return out

    def _train_step(
        self, batch: Batch, lr: float, step: int, stop_requested: bool
    ) -> tuple[dict[str, float], bool]:
        """One optimizer step (number `step`); also whether any rank was asked to stop, so
        every rank stops after the same step."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        rollout: dict[str, float] = {}
        if hasattr(self.objective, "prepare"):  # GRPO: the step's completions, sampled now
            batch, rollout = self.objective.prepare(self.model, batch, step)
        # Every rank holds the global batch, so this count is already global: each label
        # weighs the same whatever micro-batch or rank it falls in (transformers#35203).
        n_labels = self.objective.count(batch)
        # DDP averages gradients over ranks; scale by the world size to keep a plain sum.
        scale = world_size() / max(1, n_labels)
        micro = self._micro_batches(batch)
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, Tensor] = {}
        tokens = 0
        for i, mb in enumerate(micro):
            # Gradients cross ranks once per step: on the last micro-step only.
            with dist.grad_sync(self.engine, sync=i == len(micro) - 1):
                with self.autocast():
                    if self.step_sums:
                        loss, extra = self.engine(self.loss_fn, mb)
                        loss = loss * scale
                    else:
                        loss = self.engine(self.loss_fn, mb) * scale
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            tokens += mb["input_ids"].numel()
            if self.step_sums:
                for k, v in extra.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
        keys = sorted(sums)  # the same on every rank: the objective's own names
        totals = torch.stack(
            [
                loss_sum.float().cpu(),
                torch.tensor(float(tokens)),
                torch.tensor(float(stop_requested)),
                *(sums[k].cpu() for k in keys),
            ]
        )
        totals = all_reduce_sum(totals)
        stats = {
            "loss": float(totals[0]) / world_size(),
            "tokens": float(totals[1]),
            "labels": n_labels,
        }
        # Sums over what `count` counts (pairs), of every rank: their means over the step.
        stats |= {k: float(v) / max(1, n_labels) for k, v in zip(keys, totals[3:], strict=True)}
        # Checked before the update, on reduced values every rank shares: a poisoned step
        # reaches neither the weights nor a checkpoint.
        if not math.isfinite(stats["loss"]):
            raise self._non_finite(step, "loss", stats["loss"])
        scaled = self.scaler.is_enabled()
        if scaled:  # the true gradients, for clipping; an overflow is found here
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            stats["grad_norm"] = float(dist.full_tensor(norm))
            # Under a loss scaler an overflow is expected now and then: the scaler skips that
            # step and halves the scale, so only an unscaled run stops on it.
            if not scaled and not math.isfinite(stats["grad_norm"]):
                raise self._non_finite(step, "gradient norm", stats["grad_norm"])
        if scaled:
            stats["loss_scale"] = float(self.scaler.get_scale())
            self.scaler.step(self.optimizer)  # skipped where the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats["supervised_fraction"] = n_labels / max(1.0, stats["tokens"])
        if "n_real" in batch and "n_computed" in batch:  # the batch's own figure, before trimming
            stats["padding_efficiency"] = batch["n_real"] / max(1, batch["n_computed"])
        return stats | rollout, bool(totals[2] > 0)

    def _non_finite(self, step: int, what: str, value: float) -> NanotuneError:
        self.optimizer.zero_grad(set_to_none=True)
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return NanotuneError(
            f"step {step}: training {what} is {value}, so the run stopped before applying it "
            f"({kept}); lower train.lr (now {self.config.lr:g}) or check the data for broken "
            "examples, then run again (--resume continues from the last checkpoint)"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Objective metrics over the validation batches (capped by `eval_batches`)."""
        batches = self.val_batches[: self.config.eval_batches]
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        for batch in batches:
            for mb in self._micro_batches(batch):
                with self.autocast():
                    for k, v in self.engine(self.objective.eval_sums, mb).items():
                        sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        dist.reshard(self.engine)  # checkpoints and weight restores expect sharded parameters
        self.model.train(was_training)
        return self.objective.summarize(dict(zip(keys, reduced.tolist(), strict=True)))

    def _state(self, pos: _Position) -> dict:
        return {
            **asdict(pos),
            "optimizer": ckpt.optimizer_state(self.optimizer),
            "schedule": {"total_steps": self.total_steps},  # lr is a pure function of the step
            "rng": dist.gather_objects(ckpt.rng_state()),  # per rank: dropout differs by rank
            "world_size": world_size(),
            "grad_scaler": self.scaler.state_dict(),  # {} unless float16 autocast
            # GRPO: the generation batch that later steps of its num_iterations reuse.
            "objective": self.objective.state() if hasattr(self.objective, "state") else None,
        }

    def _save(self, pos: _Position) -> Path:
        # Gathering (FSDP2) involves every rank; only rank 0 writes.
        path = self.ckpt_dir / f"step-{pos.step}"
        state = self._state(pos)
        weights = ckpt.trainable_state(self.model)

        def write() -> None:
            ckpt.save_checkpoint(path, weights, state, self.resolved_config)
            ckpt.prune(self.ckpt_dir, self.config.keep_last)

        # on_main hands a failure on rank 0 (a full disk, say) to every rank: none waits alone.
        dist.on_main(write)
        return path

    def _resume(self) -> tuple[_Position, list[str]]:
        """Load the newest intact checkpoint; also notes on damaged newer ones passed over."""
        dirs = ckpt.step_dirs(self.ckpt_dir)
        if not dirs:
            raise NanotuneError(
                f"{self.ckpt_dir}: no checkpoint to resume from (the run stopped before its "
                "first one; they are written at the end of each epoch, every train.save_every "
                "steps and on Ctrl-C); start over with --overwrite"
            )
        damaged: list[ckpt.DamagedCheckpoint] = []
        for path in reversed(dirs):
            try:
                weights, state = ckpt.load_checkpoint(path)
                break
            except ckpt.DamagedCheckpoint as e:
                damaged.append(e)
        else:
            raise NanotuneError(
                f"no intact checkpoint to resume from in {self.ckpt_dir} (the newest, "
                f"{damaged[0].directory.name}: {damaged[0].reason}); start over with --overwrite"
            )
        notes = [
            f"checkpoint {e.directory} is damaged ({e.reason}); resuming from {path} instead"
            for e in damaged
        ]
        saved_world = state.get("world_size", 1)
        if saved_world != world_size():
            raise NanotuneError(
                f"{path}: the checkpoint was made by {saved_world} process(es) but this run has "
                f"{world_size()}; the data order depends on the global batch, so resume with "
                f"{saved_world} (torchrun --nproc-per-node ... for {saved_world} ranks in all)"
            )
        if state["schedule"]["total_steps"] != self.total_steps:
            raise NanotuneError(
                f"{path}: the checkpoint was made for {state['schedule']['total_steps']} steps but "
                f"this config gives {self.total_steps}; resume with the run's own config"
            )
        ckpt.load_trainable(self.model, weights, path)
        ckpt.load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        rng = state["rng"]
        ckpt.set_rng_state(rng[dist.rank()] if isinstance(rng, list) else rng)
        if hasattr(self.objective, "load_state"):
            self.objective.load_state(state.get("objective"))
        known = {f.name for f in fields(_Position)}  # older checkpoints lack the newer fields
        return _Position(**{k: v for k, v in state.items() if k in known}), notes

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to `total_steps` (or an early stop); with `resume`, continue from the latest
        intact checkpoint in run_dir, ending with the same weights as an uninterrupted run.

        SIGINT/SIGTERM stop it after the current step with a checkpoint (raising Interrupted).
        """
        cfg = self.config
        pos, notes = self._resume() if resume else (_Position(), [])
        if not resume:
            seed_everything(cfg.seed)
        log = RunLogger(
            self.run_dir,
            self.total_steps,
            pos.step,
            self.progress,
            cfg.report_to,
            project=cfg.project,
            hparams=self.resolved_config or {"train": asdict(cfg)},
        )
        for note in notes:
            log.info(note)
        if resume:
            log.info(f"resumed from step {pos.step} (epoch {pos.epoch}, batch {pos.batch_index})")
        # The first record of each process carries the counts, for the report's headline.
        trainable, total = parameter_counts(self.model)
        precision, why = compute_precision(cfg, self.device)
        scaler = ", loss scaling by a GradScaler" if self.scaler.is_enabled() else ""
        log.info(f"compute precision: {precision} ({why}){scaler}")
        once = {"trainable_params": trainable, "total_params": total, "precision": precision}
        prefix = self._frozen_prefix(log)
        self.compiled.start(log.info)
        steps_here = 0
        self.model.train()
        best = pos.best
        result = TrainResult(
            step=pos.step,
            train_loss=None,
            best_step=best["step"],
            best_eval=best["eval"],
            stopped_early=pos.stopped_early,
        )
        started = window_start = time.perf_counter()
        window_tokens = 0.0
        saved_at = pos.step if resume else None
        interrupted = False
        try:
            with _StopSignals() as signals:
                while pos.step < self.total_steps and not pos.stopped_early:
                    batches = self._epoch(pos.epoch)
                    if pos.batch_index >= len(batches):
                        pos.epoch, pos.batch_index = pos.epoch + 1, 0
                        continue
                    lr = lr_at(pos.step, self.total_steps, cfg)
                    batch = batches[pos.batch_index]
                    step_start = time.perf_counter()
                    stats, interrupted = self._train_step(
                        batch, lr, pos.step + 1, signals.signum is not None
                    )
                    steps_here += 1
                    once |= self.compiled.after_step(
                        steps_here,
                        time.perf_counter() - step_start,
                        self.total_steps - pos.step - 1,
                        log.info,
                    )
                    pos.step, pos.batch_index = pos.step + 1, pos.batch_index + 1
                    step = pos.step
                    result.step, result.train_loss = step, stats["loss"]
                    window_tokens += stats["tokens"]
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        tps = window_tokens / max(now - window_start, 1e-9)
                        record = {"step": step, "epoch": pos.epoch, "lr": lr, **stats}
                        # elapsed_s: seconds of this process's loop so far (evaluations included).
                        log.log({**record, "tokens_per_s": tps, "elapsed_s": now - started, **once})
                        once = {}
                        log.progress(
                            step,
                            {
                                "loss": f"{stats['loss']:.4f}",
                                "lr": f"{lr:.2e}",
                                "tok/s": f"{tps:,.0f}",
                            },
                        )
                        window_tokens, window_start = 0.0, time.perf_counter()
                    if self.val_batches and cfg.eval_every and step % cfg.eval_every == 0:
                        pos.stopped_early = self._eval_and_track(step, best, log, result)
                        pos.evaluated_at = step
                    if pos.stopped_early:
                        log.info(
                            f"early stop at step {step}: no better eval loss in "
                            f"{cfg.early_stopping_patience} evaluations"
                        )
                    if pos.stopped_early or interrupted:
                        break
                    # The last step's checkpoint comes after the final evaluation, below.
                    epoch_end = pos.batch_index >= len(batches)
                    periodic = cfg.save_every and step % cfg.save_every == 0
                    if step < self.total_steps and (epoch_end or periodic):
                        self._save(pos)
                        saved_at = step
                if not interrupted:
                    if self.val_batches and pos.evaluated_at != pos.step:
                        self._eval_and_track(pos.step, best, log, result)
                        pos.evaluated_at, saved_at = pos.step, None
                    if saved_at != pos.step:
                        self._save(pos)
                if interrupted or signals.signum is not None:
                    path = self._save(pos) if interrupted else self.ckpt_dir / f"step-{pos.step}"
                    # A rank can learn of the stop from another one: it then reports SIGTERM,
                    # what torchrun sends its workers.
                    signum = signals.signum or signal.SIGTERM
                    raise Interrupted(
                        signum,
                        f"stopped by {signal.Signals(signum).name} after step {pos.step} of "
                        f"{self.total_steps}; saved checkpoint {path}; {RESUME_HINT}",
                    )
            result.stopped_early = pos.stopped_early
            if cfg.keep_best and best["step"] is not None and best["step"] != pos.step:
                self._restore_best(best, log, result)
        finally:
            self.compiled.close(log.info)
            if prefix is not None:
                log.info(f"frozen prefix: {prefix.describe()}")
                self.model.cache_frozen_prefix(None)
                prefix.close()
            log.close()
        result.best_step, result.best_eval = best["step"], dict(best["eval"])
        return result

    def _frozen_prefix(self, log: RunLogger) -> PrefixStore | None:
        """A store for the states of the model's frozen leading blocks, attached to the model,
        when it can use one (a classifier trained with last_n) and `frozen_prefix_cache` is on."""
        cfg = self.config
        if not cfg.frozen_prefix_cache or not hasattr(self.model, "cache_frozen_prefix"):
            return None
        n, why = self.model.frozen_prefix_layers()
        if not n:
            if why:
                log.info(f"frozen prefix computed at every pass: {why}")
            return None
        if world_size() > 1 and dist.resolve_strategy(cfg.strategy) == "fsdp":
            log.info("frozen prefix computed at every pass: fsdp shards the blocks across ranks")
            return None
        mib = cfg.frozen_prefix_ram_mib
        ram = mib * 2**20 if mib is not None else available_memory() // 4
        path = self.run_dir / f"frozen-prefix-rank{dist.rank()}.bin"
        store = PrefixStore(ram, path)
        self.model.cache_frozen_prefix(store)
        log.info(
            f"frozen prefix: blocks 0-{n - 1} run once per row, without autograd, and later "
            f"epochs and evaluations reuse their states ({ram / 2**20:,.0f} MiB in RAM, then "
            f"{path.name}, deleted at the end)"
        )
        return store

    def _restore_best(self, best: dict[str, Any], log: RunLogger, result: TrainResult) -> None:
        path = self.ckpt_dir / "best"
        try:
            weights, _ = ckpt.load_checkpoint(path)
        except ckpt.DamagedCheckpoint as e:  # the run's own weights are still good ones
            log.info(f"{path} is damaged ({e.reason}): keeping the last weights, not the best")
            return
        ckpt.load_trainable(self.model, weights, path)
        result.eval = dict(best["eval"])
        log.info(f"restored the best weights (step {best['step']})")

    def _eval_and_track(
        self, step: int, best: dict[str, Any], log: RunLogger, result: TrainResult
    ) -> bool:
        """Evaluate, log, keep the best weights; True when early stopping should stop the run."""
        metrics = self.evaluate()
        result.eval = metrics
        log.log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        log.info(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in metrics.items()))
        best_loss = best["eval"].get("loss", math.inf)
        if metrics["loss"] < best_loss:
            best.update(step=step, eval=metrics, bad_evals=0)
            if self.config.keep_best:
                weights = ckpt.trainable_state(self.model)  # a gather under FSDP2: all ranks
                if is_main():
                    ckpt.save_checkpoint(
                        self.ckpt_dir / "best", weights, {"step": step, "eval": metrics}
                    )
            barrier()
            return False
        best["bad_evals"] += 1
        patience = self.config.early_stopping_patience
        return patience is not None and best["bad_evals"] >= patience

"""TrainConfig: every knob of the training loop, validated on construction."""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Literal

from nanotune.errors import NanotuneError

# Experiment trackers, each named as the package it needs (`pip install <name>`).
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, batching, evaluation, checkpoints, precision.

    The optimizer step sees `micro_batch_size * grad_accum * world_size` rows (the global
    batch): under torchrun every process runs `grad_accum` micro-steps of `micro_batch_size`
    rows, and 2 processes x micro-batch 2 train exactly as 1 process x micro-batch 4.
    """

    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to norms, biases (1-D tensors) or embeddings."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up; ignored when `warmup_ratio` is set."""
    warmup_ratio: float | None = None
    """Warm-up as a fraction of the total steps (0..1); overrides `warmup_steps`."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, from `lr` towards `lr * min_lr_ratio`."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of `lr` (cosine and linear)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    micro_batch_size: int = 8
    """Rows per forward/backward pass (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (by each process)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides `epochs` when set."""
    epochs: int = 1
    """Passes over the training set when `max_steps` is not set."""
    eval_every: int = 0
    """Evaluate on the validation set every N optimizer steps (0: only at the end)."""
    eval_batches: int | None = None
    """Cap on validation batches per evaluation (null: the whole validation set)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better validation loss (null: never)."""
    keep_best: bool = True
    """Restore the weights of the best evaluation before the run ends."""
    save_every: int = 0
    """Also write a resumable checkpoint every N optimizer steps (0: only the ones always
    written: at the end of each epoch, at the end of training and when stopped by a signal)."""
    keep_last: int = 2
    """Resumable checkpoints (checkpoints/step-N) kept on disk; older ones are deleted."""
    seed: int = 1337
    """Seeds torch, python and numpy, and the data order of every epoch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute precision (bf16/fp16/fp32 also accepted): auto = bfloat16 autocast (fp32 master
    weights, optimizer state, loss and norms) where the device multiplies bf16 in hardware - a
    GPU with native bf16 (Ampere and later), a CPU with AVX512_BF16 or AMX - else float16
    autocast with a loss scaler (GradScaler) on a GPU, float32 on a CPU; the run log says which
    was chosen and why. float32 is exact and reproducible across machines."""
    compile: bool | Literal["auto"] = "auto"
    """Run the model's blocks through torch.compile (inductor) for the training forward and
    backward: true, false, or auto = time the first steps eager and compile only where the rest
    of the run is long enough to win the compile time back (on a CPU: past ~10 minutes of
    steps). Varied lengths do not recompile; the run log gives the compile seconds."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    frozen_prefix_cache: bool = True
    """Compute the states of a classifier's frozen leading blocks (method last_n) once per
    text and reuse them in later epochs and evaluations: the same values, so the same run,
    without the work. Not used where dropout would make them differ at every pass."""
    frozen_prefix_ram_mib: int | None = None
    """RAM for those states; past it they go to a memory-mapped file in the run directory,
    deleted at the end (null: a quarter of the memory available when training starts)."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'; under torchrun, auto
    and cuda mean cuda:LOCAL_RANK."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several processes (torchrun): ddp replicates the model, fsdp shards it (FSDP2,
    for models that do not fit one device); auto = ddp. Ignored in a single process."""
    dist_timeout: float = 300.0
    """Seconds a collective waits for the other processes before the run fails (not hangs)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=list
    )
    """Experiment trackers that also receive the metrics (metrics.jsonl is always written);
    each is an optional package, imported only when named here. Each gets the run's config as
    hyperparameters, and `--resume` continues the same tracker run (its id is kept in the run
    directory, `trackers.json`)."""
    project: str | None = None
    """The trackers' project (the MLflow experiment); None: W&B's WANDB_PROJECT, else
    'nanotune' (MLflow: its own default experiment)."""
    push_to_hub: str | None = None
    """Hub repository id (owner/name) that final/ is uploaded to after a successful run; needs
    a token (HF_TOKEN or `hf auth login`)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives lists
        positive = {
            "lr": self.lr,
            "eps": self.eps,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "epochs": self.epochs,
            "log_every": self.log_every,
            "keep_last": self.keep_last,
            "dist_timeout": self.dist_timeout,
        }
        for name, value in positive.items():
            if value <= 0:
                raise NanotuneError(f"train.{name}: must be > 0, got {value}")
        non_negative = {
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise NanotuneError(f"train.{name}: must be >= 0, got {value}")
        for name, value in {
            "max_steps": self.max_steps,
            "eval_batches": self.eval_batches,
            "early_stopping_patience": self.early_stopping_patience,
            "max_grad_norm": self.max_grad_norm,
        }.items():
            if value is not None and value <= 0:
                raise NanotuneError(f"train.{name}: must be > 0 or null, got {value}")
        if self.frozen_prefix_ram_mib is not None and self.frozen_prefix_ram_mib < 0:
            raise NanotuneError(
                "train.frozen_prefix_ram_mib: must be >= 0 or null, "
                f"got {self.frozen_prefix_ram_mib}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise NanotuneError(f"train.betas: need two values in [0, 1), got {list(self.betas)}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise NanotuneError(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise NanotuneError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            close = difflib.get_close_matches(self.device, ["auto", "cpu", "cuda"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NanotuneError(
                f"train.device: unknown device {self.device!r}; use auto, cpu, cuda or cuda:N{hint}"
            )

        # Checked when the config is read: a missing package must not stop a run at step one.
        for tracker in self.report_to:
            if tracker not in TRACKERS:
                raise NanotuneError(
                    f"train.report_to: unknown tracker {tracker!r}; use {', '.join(TRACKERS)}"
                )
            if importlib.util.find_spec(tracker) is None:
                raise NanotuneError(
                    f"train.report_to: {tracker} is not installed; pip install {tracker}, or "
                    f"remove {tracker} from report_to"
                )

    @property
    def batch_size(self) -> int:
        """Rows per optimizer step in one process (times the world size: the global batch)."""
        return self.micro_batch_size * self.grad_accum

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_ratio is not None:
            return int(self.warmup_ratio * total_steps)
        return self.warmup_steps


PreferenceObjectiveName = Literal["dpo", "simpo", "orpo", "reward"]
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


@dataclass
class PreferenceConfig:
    """What a run learns from `data.format: preference` pairs (docs: training/preference.py)."""

    objective: PreferenceObjectiveName | None = None
    """dpo, simpo or orpo train the policy on the pairs; reward trains a reward model (a scalar
    head on the last token, Bradley–Terry loss). null = dpo for preference data; any other
    format trains as its own task and must leave this unset."""
    beta: float | None = None
    """dpo: the KL strength (TRL's beta); simpo: the reward scale. null = 0.1 (dpo), 2.0 (simpo)."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """dpo: the loss of the implicit reward margin: sigmoid (DPO), ipo or hinge (SLiC)."""
    label_smoothing: float = 0.0
    """dpo (sigmoid) and simpo: the assumed share of flipped labels, in [0, 0.5) (cDPO)."""
    simpo_gamma: float = 1.0
    """simpo: the target reward margin (gamma)."""
    orpo_lambda: float = 0.1
    """orpo: the weight of the odds-ratio term beside the chosen responses' NLL (lambda)."""

    def __post_init__(self) -> None:
        if self.objective not in (None, "dpo", "simpo", "orpo", "reward"):
            raise NanotuneError(
                f"preference.objective: {self.objective!r} is not one of dpo, simpo, orpo, reward"
            )
        if self.loss not in ("sigmoid", "ipo", "hinge"):
            raise NanotuneError(f"preference.loss: {self.loss!r} is not one of sigmoid, ipo, hinge")
        if self.beta is not None and self.beta <= 0:
            raise NanotuneError(f"preference.beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise NanotuneError(
                f"preference.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.label_smoothing and (
            self.objective in ("orpo", "reward")
            or (self.objective != "simpo" and self.loss != "sigmoid")
        ):
            raise NanotuneError(
                "preference.label_smoothing: applies to dpo with loss: sigmoid and to simpo; "
                "set it to 0"
            )
        if self.simpo_gamma < 0:
            raise NanotuneError(f"preference.simpo_gamma: must be >= 0, got {self.simpo_gamma}")
        if self.orpo_lambda < 0:
            raise NanotuneError(f"preference.orpo_lambda: must be >= 0, got {self.orpo_lambda}")

    def resolved_objective(self) -> PreferenceObjectiveName:
        return self.objective or "dpo"

    def resolved_beta(self) -> float:
        return (
            self.beta if self.beta is not None else DEFAULT_BETA.get(self.resolved_objective(), 0.1)
        )

"""The training loop: knows batches, objectives and checkpoints; no model families or formats.

One whole fine-tuning job is `nanotune.train(...)` (`nanotune.jobs.finetune.train`).
"""

from nanotune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanotune.training.config import TrainConfig
from nanotune.training.losses import (
    ClassificationObjective,
    LMObjective,
    Objective,
    lm_loss_sum,
    objective_for,
)
from nanotune.training.schedule import lr_at
from nanotune.training.trainer import (
    Interrupted,
    Trainer,
    TrainResult,
    build_optimizer,
    param_groups,
    seed_everything,
    trainable_summary,
)

__all__ = [
    "ClassificationObjective",
    "Interrupted",
    "LMObjective",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "latest_checkpoint",
    "lm_loss_sum",
    "load_checkpoint",
    "lr_at",
    "objective_for",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
    "trainable_summary",
]

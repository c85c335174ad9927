"""The training loop: knows batches, objectives and checkpoints; no model families or formats.

`nanotune.train` is also callable: `nanotune.train("recipe.yaml")` runs one fine-tuning job
(`nanotune.workflow.train`), so the package and the one-call entry point share the short name.
"""

import sys
import types

from nanotune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanotune.train.config import TrainConfig
from nanotune.train.losses import (
    ClassificationObjective,
    LMObjective,
    Objective,
    lm_loss_sum,
    objective_for,
)
from nanotune.train.schedule import lr_at
from nanotune.train.trainer import (
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


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from nanotune.workflow import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

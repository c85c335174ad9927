"""The training loop: knows batches, objectives and checkpoints; no model families or formats.

One whole fine-tuning job is `nanotune.train(...)` (`nanotune.jobs.finetune.train`).
"""

from __future__ import annotations

from nanotune.lazy import lazy_exports
from nanotune.training.config import TrainConfig

# The torch-using modules load on first use: the config (and `nanotune --help`) stays light.
_LAZY = {
    "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ClassificationObjective": "losses",
    "LMObjective": "losses",
    "Objective": "losses",
    "lm_loss_sum": "losses",
    "objective_for": "losses",
    "token_logprobs": "losses",
    "PreferenceObjective": "preference",
    "reference_logps": "preference",
    "response_logps": "preference",
    "lr_at": "schedule",
    "Interrupted": "trainer",
    "Trainer": "trainer",
    "autocast_for": "precision",
    "TrainResult": "trainer",
    "build_optimizer": "trainer",
    "check_trainable": "trainer",
    "param_groups": "trainer",
    "seed_everything": "trainer",
}

__all__ = [
    "ClassificationObjective",
    "Interrupted",
    "LMObjective",
    "Objective",
    "PreferenceObjective",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "autocast_for",
    "build_optimizer",
    "check_trainable",
    "latest_checkpoint",
    "lm_loss_sum",
    "load_checkpoint",
    "lr_at",
    "objective_for",
    "param_groups",
    "reference_logps",
    "response_logps",
    "save_checkpoint",
    "seed_everything",
    "token_logprobs",
]

__getattr__ = lazy_exports(__name__, _LAZY)

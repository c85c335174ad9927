"""Learning-rate schedule: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

from nanotune.training.config import TrainConfig


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps.

    Warm-up is `lr * (step + 1) / (warmup + 1)`, so the first step already moves the weights
    (a schedule that starts at exactly 0 wastes it). After warm-up the decay runs from `lr` at
    the first post-warm-up step towards `lr * min_lr_ratio` at `total_steps`.
    """
    peak = config.lr
    warmup = config.warmup_for(total_steps)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return peak
    floor = peak * config.min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if config.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

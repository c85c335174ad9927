"""Atomic, complete checkpoints: trainable weights, optimizer, step, data position, RNG, config.

A checkpoint directory is written under a temporary name, fsynced and renamed, so a run killed
at any moment leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.train.dist import full_tensor, like
from nanotune.weights.atomic import atomic_dir

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
CONFIG = "config.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters that train: the whole model for full fine-tuning, adapters and heads otherwise.

    Frozen base weights are not stored: they come back from the base model on resume. FSDP2
    shards are gathered to whole tensors, so every rank must call this (rank 0 writes them).
    """
    return {
        n: full_tensor(p.detach()).cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable(model: nn.Module, weights: dict[str, Tensor], where: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise NanotuneError(
            f"{where}: checkpoint does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the run's own config"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(like(weights[n], p))


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with whole tensors: FSDP2 shards of the moments are gathered,
    so every rank must call this and the result fits any sharding on resume."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: full_tensor(v).cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`: per-parameter tensors take their parameter's layout."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, s in sd["state"].items():
        p = params[i]
        for k, v in s.items():
            if isinstance(v, Tensor) and v.shape == p.shape:
                s[k] = like(v, p)
    optimizer.load_state_dict(sd)


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path,
    weights: dict[str, Tensor],
    state: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write weights (safetensors), loop state (optimizer, step, data position, RNG) and config."""

    def write(tmp: Path) -> None:
        save_file(weights, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        if config is not None:
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))

    return atomic_dir(directory, write, kind="checkpoint")


def load_checkpoint(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    directory = Path(directory)
    try:
        weights = load_file(directory / WEIGHTS)
        state = torch.load(directory / STATE, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise NanotuneError(
            f"{directory}: unreadable checkpoint ({e}); delete it to resume from an earlier one"
        ) from e
    return weights, state


def step_dirs(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match)."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m[1]), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    dirs = step_dirs(checkpoints)
    return dirs[-1] if dirs else None


def prune(checkpoints: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and leftovers of interrupted writes."""
    for p in step_dirs(checkpoints)[:-keep_last]:
        shutil.rmtree(p)
    for p in checkpoints.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)

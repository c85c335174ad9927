"""Atomic, complete checkpoints: trainable weights, optimizer, step, data position, RNG, config.

A checkpoint directory is written under a temporary name, fsynced and renamed, so a run killed
at any moment leaves either a whole checkpoint or none. The sha256 of each file is stored
beside them, so a checkpoint damaged later (a bad disk, a copy cut short) is refused by name
instead of resuming from garbage.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_dir
from nanotune.training.dist import full_tensor, like

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
CONFIG = "config.json"
CHECKSUMS = "checksums.json"
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


class DamagedCheckpoint(NanotuneError):
    """A checkpoint whose files are missing, cut short or differ from what was written."""

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory, self.reason = directory, reason
        super().__init__(
            f"checkpoint {directory} is damaged ({reason}); resume from an earlier one: move "
            f"this folder out of {directory.parent} and run again with --resume"
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(
    directory: Path,
    weights: dict[str, Tensor],
    state: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write weights (safetensors), loop state (optimizer, step, data position, RNG), config
    and the checksums of all three."""
    directory = Path(directory)

    def write(tmp: Path) -> None:
        save_file(weights, tmp / WEIGHTS)
        # Through a Python file: a full disk then surfaces as OSError(ENOSPC), not only as
        # torch's "unexpected pos".
        with open(tmp / STATE, "wb") as f:
            torch.save(state, f)
        if config is not None:
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))

    return atomic_dir(
        directory,
        write,
        kind="checkpoint",
        what="checkpoint",
        fix_space="free some space (or lower train.keep_last) and continue with --resume",
        fix_access=f"make {directory.parent} a writable folder and continue with --resume",
    )


def verify_checkpoint(directory: Path) -> None:
    """Raise DamagedCheckpoint unless every file matches the checksum written with it.

    Checkpoints from before checksums were stored have none to compare and pass; their files
    are still checked for being readable when loaded.
    """
    sums_file = directory / CHECKSUMS
    if not sums_file.exists():
        return
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(directory, f"{CHECKSUMS}: unreadable ({e})") from e
    for name, want in sums.items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpoint(directory, f"{name} is missing")
        if _sha256(path) != want:
            raise DamagedCheckpoint(directory, f"{name}: sha256 differs from the one written")


def load_checkpoint(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(trainable weights, loop state) of a verified checkpoint; DamagedCheckpoint otherwise."""
    directory = Path(directory)
    verify_checkpoint(directory)
    name = WEIGHTS
    try:
        weights = load_file(directory / WEIGHTS)
        name = STATE
        state = torch.load(directory / STATE, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        raise DamagedCheckpoint(directory, f"{name}: {str(e).splitlines()[0][:200]}") from e
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

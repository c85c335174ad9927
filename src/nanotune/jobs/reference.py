"""DPO's reference policy for a run: the base with its adapters off (LoRA), or log-probabilities
computed once before training and kept with the examples and the run (any other method)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor, nn

from nanotune.data import PreferenceExample
from nanotune.data.batching import epoch_batches
from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write
from nanotune.files.read import read_safetensors
from nanotune.methods import adapters_disabled, lora_layers
from nanotune.training.preference import reference_logps

REFERENCE_FILE = "reference_logps.safetensors"
"""In the run directory: [N, 2] reference log-probs of each split's pairs, by split name."""


def adapters_are_the_reference(model: nn.Module) -> bool:
    """True when switching the adapters off gives back the model as it was before training:
    LoRA adapters are all that trains (trained embeddings or a full fine-tune are not undone)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return bool(lora_layers(model)) and all(".lora_" in n for n in trainable)


def reference_context(model: nn.Module) -> Callable[[nn.Module], AbstractContextManager] | None:
    """The context under which the model is its own reference (adapters off), or None when the
    reference must be precomputed (`attach_reference`)."""
    return adapters_disabled if adapters_are_the_reference(model) else None


def attach_reference(
    model: nn.Module,
    splits: dict[str, list[PreferenceExample]],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, Tensor]:
    """Compute the model's summed response log-probs of every pair, now (before training), and
    store them in the examples (`ref_chosen`, `ref_rejected`); returns them by split, [N, 2]."""
    out = {}
    for name, examples in splits.items():
        if not examples:
            continue
        batches = epoch_batches(
            examples, batch_size, 0, 0, task="preference", pad_id=pad_id, shuffle=False
        )
        moved = (
            {k: v.to(device) for k, v in b.items() if isinstance(v, Tensor) and k != "ref_logps"}
            for b in batches
        )
        with autocast() if autocast else contextlib.nullcontext():
            logps = reference_logps(model, moved).float()
        set_reference(examples, logps)
        out[name] = logps
    return out


def set_reference(examples: list[PreferenceExample], logps: Tensor) -> None:
    for ex, (chosen, rejected) in zip(examples, logps.tolist(), strict=True):
        ex.ref_chosen, ex.ref_rejected = chosen, rejected


def save_reference(path: str | Path, logps: dict[str, Tensor]) -> Path:
    """Write the reference log-probs (by split) atomically, for a resumed run to read back."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in logps.items()}
    return atomic_write(path, save(tensors))


def load_reference(
    path: str | Path, splits: dict[str, list[PreferenceExample]]
) -> dict[str, Tensor]:
    """Read the reference log-probs a run stored and put them in its examples; the pairs must
    be the same (their number per split is checked)."""
    fix = "start the run over (--overwrite) or restore the file"
    tensors = read_safetensors(path, "the run's reference log-probs", fix)
    for name, examples in splits.items():
        if not examples:
            continue
        logps = tensors.get(name)
        if logps is None or logps.shape != (len(examples), 2):
            have = "none" if logps is None else f"{logps.shape[0]}"
            raise NanotuneError(
                f"{path}: holds reference log-probs for {have} {name} pairs but the data has "
                f"{len(examples)}; {fix}"
            )
        set_reference(examples, logps)
    return tensors

"""Fine-tuning methods: transform a model in place (they know nothing of data or training)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from nanotune.methods.config import MethodConfig

# The torch-using modules load on first use: the config (and `nanotune --help`) stays light.
_LAZY = {
    "apply_method": "apply",
    "trainable_parameters": "apply",
    "trainable_report": "apply",
    "SequenceClassifier": "classifier",
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "lora_layers": "lora",
    "merge": "lora",
}

__all__ = [
    "LoRALinear",
    "MethodConfig",
    "SequenceClassifier",
    "apply_lora",
    "apply_method",
    "lora_layers",
    "merge",
    "trainable_parameters",
    "trainable_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

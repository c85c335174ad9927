"""Fine-tuning methods: transform a model in place (they know nothing of data or training)."""

from __future__ import annotations

from nanotune.lazy import lazy_exports
from nanotune.methods.config import MethodConfig

# The torch-using modules load on first use: the config (and `nanotune --help`) stays light.
_LAZY = {
    "apply_method": "apply",
    "trainable_report": "apply",
    "SequenceClassifier": "classifier",
    "LoRALinear": "lora",
    "adapters_disabled": "lora",
    "apply_lora": "lora",
    "lora_layers": "lora",
    "merge": "lora",
}

__all__ = [
    "LoRALinear",
    "MethodConfig",
    "SequenceClassifier",
    "adapters_disabled",
    "apply_lora",
    "apply_method",
    "lora_layers",
    "merge",
    "trainable_report",
]

__getattr__ = lazy_exports(__name__, _LAZY)

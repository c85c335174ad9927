"""Fine-tuning methods: transform a model in place (they know nothing of data or training)."""

from nanotune.methods.apply import apply_method, trainable_parameters, trainable_report
from nanotune.methods.classifier import SequenceClassifier
from nanotune.methods.config import MethodConfig
from nanotune.methods.lora import LoRALinear, apply_lora, lora_layers, merge

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

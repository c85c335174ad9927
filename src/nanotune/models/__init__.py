"""The decoder and its configuration: no files, no training."""

from __future__ import annotations

from nanotune.lazy import lazy_exports
from nanotune.models.config import DEFAULT_MODEL, PRESET_ALIASES, PRESETS, ModelConfig, Preset

# The torch-using modules load on first use: the config (and `nanotune --help`) stays light.
_LAZY = {
    "KVCache": "transformer",
    "Transformer": "transformer",
}

__all__ = [
    "PRESET_ALIASES",
    "DEFAULT_MODEL",
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Preset",
    "Transformer",
]

__getattr__ = lazy_exports(__name__, _LAZY)

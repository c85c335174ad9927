"""The decoder and its configuration: no files, no training."""

from __future__ import annotations

from importlib import import_module
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

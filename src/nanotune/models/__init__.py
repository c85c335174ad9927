"""The decoder and its configuration: no files, no training."""

from nanotune.models.config import ALIASES, DEFAULT_MODEL, PRESETS, ModelConfig, Preset
from nanotune.models.transformer import KVCache, Transformer

__all__ = ["ALIASES", "DEFAULT_MODEL", "PRESETS", "KVCache", "ModelConfig", "Preset", "Transformer"]

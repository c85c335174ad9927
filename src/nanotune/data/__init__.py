"""Data: sources -> rows -> formats -> Example/ClassExample/PreferenceExample -> batches.

Batches are padded or packed."""

from __future__ import annotations

from nanotune.data.config import DataConfig
from nanotune.lazy import lazy_exports

# The torch-using modules load on first use: the config (and `nanotune --help`) stays light.
_LAZY = {
    "collate_class": "batching",
    "collate_lm": "batching",
    "collate_preference": "batching",
    "efficiency": "batching",
    "epoch_batches": "batching",
    "IGNORE": "example",
    "ClassExample": "example",
    "Example": "example",
    "PreferenceExample": "example",
    "Row": "example",
    "Task": "example",
    "END_MARKER": "formats",
    "MARKER_TOKENS": "formats",
    "chat_prompt_ids": "formats",
    "required_special_tokens": "formats",
    "row_messages": "formats",
    "Datasets": "pipeline",
    "build_datasets": "pipeline",
    "task_of": "pipeline",
    "iter_source": "sources",
}

__all__ = [
    "END_MARKER",
    "IGNORE",
    "MARKER_TOKENS",
    "ClassExample",
    "DataConfig",
    "Datasets",
    "Example",
    "PreferenceExample",
    "Row",
    "Task",
    "build_datasets",
    "chat_prompt_ids",
    "collate_class",
    "collate_lm",
    "collate_preference",
    "efficiency",
    "epoch_batches",
    "iter_source",
    "required_special_tokens",
    "row_messages",
    "task_of",
]

__getattr__ = lazy_exports(__name__, _LAZY)

"""Data: sources -> rows -> formats -> Example/ClassExample -> batches (padded or packed)."""

from nanotune.data.batching import collate_class, collate_lm, efficiency, epoch_batches
from nanotune.data.config import DataConfig
from nanotune.data.example import IGNORE, ClassExample, Example, Row, Task
from nanotune.data.formats import (
    END_MARKER,
    MARKER_TOKENS,
    chat_prompt_ids,
    required_special_tokens,
    row_messages,
)
from nanotune.data.pipeline import Datasets, build_datasets, task_of
from nanotune.data.sources import iter_source

__all__ = [
    "END_MARKER",
    "IGNORE",
    "MARKER_TOKENS",
    "ClassExample",
    "DataConfig",
    "Datasets",
    "Example",
    "Row",
    "Task",
    "build_datasets",
    "chat_prompt_ids",
    "collate_class",
    "collate_lm",
    "efficiency",
    "epoch_batches",
    "iter_source",
    "required_special_tokens",
    "row_messages",
    "task_of",
]

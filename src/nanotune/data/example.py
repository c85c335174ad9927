"""The plain objects of the data pipeline: rows in, examples out (contract in docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nanotune.errors import NanotuneError

IGNORE = -100  # label of a token that is not supervised (Hugging Face / PyTorch convention)

# What a run learns and is measured on: the next tokens (every LM format, `Example`), one
# label per example (`ClassExample`) or which of two responses is preferred
# (`PreferenceExample`). Decided once, when the data is built (`Datasets.task`).
Task = Literal["lm", "classification", "preference"]


@dataclass
class Example:
    """A language-model example.

    `labels` are unshifted: ids[i] where token i is supervised, else -100."""

    ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} ids but {len(self.labels)} labels")


@dataclass
class ClassExample:
    """A classification example: token ids and the index of its class."""

    ids: list[int]
    label: int


@dataclass
class PreferenceExample:
    """A preference pair: the prompt's ids once, and the ids of the chosen and the rejected
    response. Every response token is supervised (its end, EOS or the end-of-turn token, too);
    no prompt token is.

    ref_chosen / ref_rejected: the reference policy's summed log-probability of each response,
    when computed before training (full fine-tuning keeps no reference model in memory).
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def length(self) -> int:
        """Tokens of the longer of its two sequences, prompt included."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


class Row(dict):
    """One record: its fields, plus `where` (file and line/row) for error messages."""

    def __init__(self, fields: dict[str, Any], where: str) -> None:
        super().__init__(fields)
        self.where = where


class BadRow(NanotuneError):
    """A row that cannot be read or formatted; the message starts with its file and line/row."""

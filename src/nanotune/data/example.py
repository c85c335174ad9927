"""The plain objects that leave the data pipeline (contract in docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label of a token that is not supervised (Hugging Face / PyTorch convention)


@dataclass
class Example:
    """A language-model example. `labels` are unshifted: ids[i] where token i is supervised, else -100."""

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

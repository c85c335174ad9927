"""LM examples held compactly: every token id of a split in one int32 array and one byte per
token saying whether it is supervised, read back as `Example`s one at a time.

Two Python lists per example cost about 70 bytes a token (a pointer each, and an int object per
id above 256); this costs 5, so a million-row SFT set fits next to a model. An `Example`'s labels
are its ids where supervised and -100 elsewhere (docs/design.md), which is all the mask keeps.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import overload

import numpy as np

from nanotune.data.example import IGNORE, Example

CHUNK = 1 << 20  # tokens gathered as lists before each conversion to arrays


class ExampleStore(Sequence[Example]):
    """A split's LM examples: `ids` and `supervised` [total tokens], example i at
    `offsets[i]:offsets[i + 1]`. Reading an item builds its `Example` (lists, as everywhere)."""

    def __init__(self, ids: np.ndarray, supervised: np.ndarray, offsets: np.ndarray) -> None:
        if len(ids) != len(supervised) or offsets[-1] != len(ids):
            raise ValueError("ids, supervised and offsets do not describe the same tokens")
        self.ids, self.supervised, self.offsets = ids, supervised, offsets

    @classmethod
    def build(cls, examples: Iterable[Example]) -> ExampleStore:
        """Pack examples as they come (the caller need not hold them all): lists gathered up to
        CHUNK tokens at a time, then converted to arrays in one call each."""
        ids_parts: list[np.ndarray] = []
        supervised_parts: list[np.ndarray] = []
        lengths = array("q")
        ids: list[int] = []
        labels: list[int] = []

        def flush() -> None:
            flat, y = np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32)
            supervised = y != IGNORE
            wrong = np.flatnonzero(supervised & (y != flat))
            if len(wrong):
                t = int(wrong[0])
                ends = np.cumsum(np.frombuffer(lengths, dtype=np.int64))
                n = int(np.searchsorted(ends, done + t, side="right"))
                raise ValueError(
                    f"example {n}: label {y[t]} on token {flat[t]}; an LM label is its token "
                    "or -100"
                )
            ids_parts.append(flat)
            supervised_parts.append(supervised)

        done = 0  # tokens already flushed
        for ex in examples:
            ids += ex.ids
            labels += ex.labels
            lengths.append(len(ex.ids))
            if len(ids) >= CHUNK:
                flush()
                done += len(ids)
                ids, labels = [], []
        flush()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
        return cls(np.concatenate(ids_parts), np.concatenate(supervised_parts), offsets)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example, without building any."""
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.supervised.nbytes + self.offsets.nbytes

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _example(self, i: int) -> Example:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        lo, hi = self.offsets[i], self.offsets[i + 1]
        ids = self.ids[lo:hi]
        labels = np.where(self.supervised[lo:hi], ids, IGNORE)
        return Example(ids.tolist(), labels.tolist())

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self._example(k) for k in range(*i.indices(len(self)))]
        return self._example(int(i))

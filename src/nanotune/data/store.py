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

CHUNK = 1 << 20  # labels gathered before each conversion to the supervised mask
TAKE_BLOCK = 1 << 14  # examples gathered at once by `take`


class ExampleStore(Sequence[Example]):
    """A split's LM examples: `ids` and `supervised` [total tokens], example i at
    `offsets[i]:offsets[i + 1]`. Reading an item builds its `Example` (lists, as everywhere)."""

    def __init__(self, ids: np.ndarray, supervised: np.ndarray, offsets: np.ndarray) -> None:
        if len(ids) != len(supervised) or offsets[-1] != len(ids):
            raise ValueError("ids, supervised and offsets do not describe the same tokens")
        self.ids, self.supervised, self.offsets = ids, supervised, offsets

    @classmethod
    def build(cls, examples: Iterable[Example]) -> ExampleStore:
        """Pack examples as they come (the caller need not hold them all): ids straight into
        one int32 buffer, labels CHUNK tokens at a time into the supervised mask."""
        ids, labels, lengths = array("i"), array("i"), array("q")
        supervised_parts: list[np.ndarray] = []

        def flush() -> None:
            n = len(labels)
            flat = np.frombuffer(ids, dtype=np.int32)[len(ids) - n :]
            y = np.frombuffer(labels, dtype=np.int32)
            supervised = y != IGNORE
            wrong = np.flatnonzero(supervised & (y != flat))
            if len(wrong):
                t = len(ids) - n + int(wrong[0])
                ends = np.cumsum(np.frombuffer(lengths, dtype=np.int64))
                raise ValueError(
                    f"example {int(np.searchsorted(ends, t, side='right'))}: label "
                    f"{labels[int(wrong[0])]} on token {ids[t]}; an LM label is its token or -100"
                )
            supervised_parts.append(supervised)

        for ex in examples:
            ids.fromlist(ex.ids)  # twice as fast as extend (no iterator per element)
            labels.fromlist(ex.labels)
            lengths.append(len(ex.ids))
            if len(labels) >= CHUNK:
                flush()  # its views of the buffers are gone when it returns: they may grow
                labels = array("i")
        flush()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
        return cls(np.frombuffer(ids, dtype=np.int32), np.concatenate(supervised_parts), offsets)

    def take(self, indices: np.ndarray) -> ExampleStore:
        """The examples at `indices`, in that order, as a new store. Tokens are gathered a
        block of examples at a time, so the gather's index never spans the whole split."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == len(self) and np.array_equal(indices, np.arange(len(self))):
            return self
        starts, lengths = self.offsets[indices], self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(offsets[-1], dtype=np.int32)
        supervised = np.empty(offsets[-1], dtype=bool)
        for lo in range(0, len(indices), TAKE_BLOCK):
            hi = min(lo + TAKE_BLOCK, len(indices))
            # Token t of the new store is token t - offsets[k] + starts[k] of the old one.
            shift = np.repeat(starts[lo:hi] - offsets[lo:hi], lengths[lo:hi])
            where = np.arange(offsets[lo], offsets[hi], dtype=np.int64) + shift
            ids[offsets[lo] : offsets[hi]] = self.ids[where]
            supervised[offsets[lo] : offsets[hi]] = self.supervised[where]
        return ExampleStore(ids, supervised, offsets)

    def chunked(self, eos_id: int, block_size: int) -> ExampleStore:
        """The examples as documents, each followed by `eos_id`, concatenated and cut into
        blocks of `block_size` tokens (a last block shorter than 2 is dropped); all supervised."""
        ids = np.insert(np.asarray(self.ids), self.offsets[1:], eos_id).astype(np.int32, copy=False)
        if len(ids) % block_size == 1:
            ids = ids[:-1]  # a 1-token block has nothing to predict
        offsets = np.append(np.arange(0, len(ids), block_size, dtype=np.int64), len(ids))
        return ExampleStore(ids, np.ones(len(ids), dtype=bool), offsets)

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

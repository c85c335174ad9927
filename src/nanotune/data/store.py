"""LM examples held compactly: every token id of a split in one int32 array and one byte per
token saying whether it is supervised, read back as `Example`s one at a time.

Two Python lists per example cost about 70 bytes a token (a pointer each, and an int object per
id above 256); this costs 5, so a million-row SFT set fits next to a model. An `Example`'s labels
are its ids where supervised and -100 elsewhere (docs/design.md), which is all the mask keeps.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np

from nanotune.data.example import IGNORE, Example

CHUNK = 1 << 20  # labels gathered before each conversion to the supervised mask
TAKE_BLOCK = 1 << 14  # examples a view copies out at once (`blocks`)


class ExampleStore(Sequence[Example]):
    """A split's LM examples: `ids` and `supervised` [total tokens], token example k at
    `offsets[k]:offsets[k + 1]`. Reading an item builds its `Example` (lists, as everywhere).

    `order` makes a store a view: its example i is token example `order[i]`, so the splits cut
    from one source share its tokens (`take`) and none is copied until it is written
    (`blocks`, `compact`); None is every token example in turn.
    """

    def __init__(
        self,
        ids: np.ndarray,
        supervised: np.ndarray,
        offsets: np.ndarray,
        order: np.ndarray | None = None,
    ) -> None:
        if len(ids) != len(supervised) or offsets[-1] != len(ids):
            raise ValueError("ids, supervised and offsets do not describe the same tokens")
        self.ids, self.supervised, self.offsets, self.order = ids, supervised, offsets, order

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

    @classmethod
    def concat(cls, stores: Sequence[ExampleStore]) -> ExampleStore:
        """The examples of `stores`, one store after another, in a store of their own."""
        if len(stores) == 1:
            return stores[0]
        own = [s.compact() for s in stores]
        lengths = np.concatenate([s.lengths for s in own])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([np.asarray(s.ids[s.offsets[0] : s.offsets[-1]]) for s in own])
        supervised = np.concatenate(
            [np.asarray(s.supervised[s.offsets[0] : s.offsets[-1]]) for s in own]
        )
        return cls(ids.astype(np.int32, copy=False), supervised, offsets)

    def take(self, indices: np.ndarray) -> ExampleStore:
        """The examples at `indices`, in that order: a view sharing these tokens."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"take: indices outside 0..{len(self) - 1}")
        if len(indices) == len(self) and np.array_equal(indices, np.arange(len(self))):
            return self
        order = indices if self.order is None else self.order[indices]
        return ExampleStore(self.ids, self.supervised, self.offsets, order)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, supervised) of the examples in order, TAKE_BLOCK examples at a time, so a
        view is copied out a block at a time (`compact`, the data cache's writer)."""
        if self.order is None:
            yield np.asarray(self.ids), np.asarray(self.supervised)
            return
        for lo in range(0, len(self.order), TAKE_BLOCK):
            rows = self.order[lo : lo + TAKE_BLOCK]
            starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
            ends = np.cumsum(lengths)
            # Token t of the block is token t - (ends[k] - lengths[k]) + starts[k], k its example.
            where = np.arange(ends[-1] if len(ends) else 0, dtype=np.int64)
            where += np.repeat(starts - (ends - lengths), lengths)
            yield self.ids[where], self.supervised[where]

    def compact(self) -> ExampleStore:
        """This store with its own tokens in order (itself when it is not a view)."""
        if self.order is None:
            return self
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        ids = np.empty(offsets[-1], dtype=np.int32)
        supervised = np.empty(offsets[-1], dtype=bool)
        at = 0
        for block_ids, block_supervised in self.blocks():
            ids[at : at + len(block_ids)] = block_ids
            supervised[at : at + len(block_ids)] = block_supervised
            at += len(block_ids)
        return ExampleStore(ids, supervised, offsets)

    def chunked(self, eos_id: int, block_size: int) -> ExampleStore:
        """The examples as documents, each followed by `eos_id`, concatenated and cut into
        blocks of `block_size` tokens (a last block shorter than 2 is dropped); all supervised."""
        own = self.compact()
        ids = np.insert(np.asarray(own.ids), own.offsets[1:], eos_id).astype(np.int32, copy=False)
        if len(ids) % block_size == 1:
            ids = ids[:-1]  # a 1-token block has nothing to predict
        offsets = np.append(np.arange(0, len(ids), block_size, dtype=np.int64), len(ids))
        return ExampleStore(ids, np.ones(len(ids), dtype=bool), offsets)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example, without building any."""
        lengths = np.diff(self.offsets)
        return lengths if self.order is None else lengths[self.order]

    @property
    def nbytes(self) -> int:
        """Bytes held, the shared tokens counted in full."""
        order = 0 if self.order is None else self.order.nbytes
        return self.ids.nbytes + self.supervised.nbytes + self.offsets.nbytes + order

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.order is None else len(self.order)

    def _example(self, i: int) -> Example:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        k = i if self.order is None else self.order[i]
        lo, hi = self.offsets[k], self.offsets[k + 1]
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

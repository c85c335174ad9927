"""A training split read as it trains (data.streaming): rows tokenized as they arrive, batched
in a seeded order, for data that does not fit on disk.

The stream's batches are a pure function of (seed, the stream's rows): pass p over the rows is
shuffled through a buffer of `shuffle_buffer` examples seeded by (seed, p), then cut into
batches as `epoch_batches` cuts an epoch (padded, or packed first-fit with the same open bins).
Batch k is found by reading the stream from its start, so a resumed run (a new process asked
for batch k) continues at the same row. When the rows run out, the next pass begins.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nanotune.data.batching import OPEN_BINS, collate_lm
from nanotune.data.example import Example
from nanotune.errors import NanotuneError


@dataclass
class SourcedExample(Example):
    """An example of a streamed mix, with the index of its entry in data.sources."""

    source: int = -1


class Stream:
    """The examples of a streamed split, made again on every pass over its rows.

    examples: a new iterator over the split's examples, in the stream's order.
    stats: the split's counts (rows, examples, rows left out), kept up as rows are read.
    """

    streamed = True

    def __init__(
        self,
        source: str,
        examples: Callable[[], Iterator[Example]],
        stats: Counter,
        parts: Callable[[], list[Any]] | None = None,
    ):
        self.source, self._examples, self.stats = source, examples, stats
        self._parts = parts
        self.trained: Counter = Counter()
        """A mix's examples batched so far, by source index (`SourcedExample.source`)."""

    def parts(self) -> list[Any]:
        """A mix's sources (`data.mix.MixPart`) with what was read and drawn of each so far."""
        return self._parts() if self._parts is not None else []

    def __bool__(self) -> bool:  # its length is unknown until it is read
        return True

    def batches(
        self,
        batch_size: int,
        seed: int,
        steps: int,
        *,
        pad_id: int,
        pack: bool = False,
        max_length: int | None = None,
        shuffle_buffer: int = 0,
    ) -> StreamedBatches:
        """The first `steps` batches of `batch_size` rows (sequences when packing)."""
        return StreamedBatches(
            self, batch_size, seed, steps, pad_id, pack, max_length, shuffle_buffer
        )

    def passes(self, seed: int, shuffle_buffer: int) -> Iterator[Iterator[Example]]:
        """Each pass's examples, shuffled through the seeded buffer."""
        p = 0
        while True:
            made = [0]
            rng = random.Random(f"nanotune:stream:{seed}:{p}")
            yield _counting(_shuffled(self._examples(), shuffle_buffer, rng), made)
            if not made[0]:
                raise NanotuneError(
                    f"{self.source}: the stream gave no training examples; check data.source, "
                    "data.columns and data.max_length"
                )
            p += 1


def _counting(examples: Iterator[Example], made: list[int]) -> Iterator[Example]:
    for ex in examples:
        made[0] += 1
        yield ex


def _shuffled(examples: Iterator[Example], size: int, rng: random.Random) -> Iterator[Example]:
    """A buffer of `size` examples: each arrival takes the place of one drawn at random."""
    if size <= 1:
        yield from examples
        return
    buffer: list[Example] = []
    for ex in examples:
        if len(buffer) < size:
            buffer.append(ex)
            continue
        j = rng.randrange(size)
        buffer[j], ex = ex, buffer[j]
        yield ex
    rng.shuffle(buffer)
    yield from buffer


def _rows_of_batches(
    examples: Iterator[Example], batch_size: int, pack: bool, max_length: int | None
) -> Iterator[list[list[Example]]]:
    """Batches as rows of examples: one example a row, or packed first-fit as `pack_examples`
    packs (at most OPEN_BINS open sequences; the oldest is closed when one more opens)."""
    if not pack:
        batch: list[list[Example]] = []
        for ex in examples:
            batch.append([ex])
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    if max_length is None:
        raise ValueError("packing needs max_length")
    done: list[list[Example]] = []
    open_bins: list[tuple[int, list[Example]]] = []
    for ex in examples:
        n = len(ex.ids)
        for b, (used, members) in enumerate(open_bins):
            if used + n <= max_length:
                members.append(ex)
                open_bins[b] = (used + n, members)
                break
        else:
            open_bins.append((n, [ex]))
            if len(open_bins) > OPEN_BINS:
                done.append(open_bins.pop(0)[1])
        if len(done) == batch_size:
            yield done
            done = []
    done += [members for _, members in open_bins]
    for i in range(0, len(done), batch_size):
        yield done[i : i + batch_size]


class StreamedBatches(Sequence[dict[str, Any]]):
    """`steps` batches of a stream, read in order; asking for another batch than the next one
    (a resumed run) reads the stream again from its start up to it."""

    def __init__(
        self,
        stream: Stream,
        batch_size: int,
        seed: int,
        steps: int,
        pad_id: int,
        pack: bool,
        max_length: int | None,
        shuffle_buffer: int,
    ) -> None:
        self._stream, self._steps, self._pad_id, self._pack = stream, steps, pad_id, pack
        self._plan = (batch_size, seed, max_length, shuffle_buffer)
        self._batches: Iterator[list[list[Example]]] | None = None
        self._next = 0

    def _all(self) -> Iterator[list[list[Example]]]:
        batch_size, seed, max_length, shuffle_buffer = self._plan
        for examples in self._stream.passes(seed, shuffle_buffer):
            yield from _rows_of_batches(examples, batch_size, self._pack, max_length)

    def __len__(self) -> int:
        return self._steps

    def __getitem__(self, k: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(k, int) or not 0 <= k < self._steps:
            raise IndexError(f"batch {k} of {self._steps}")
        if self._batches is None or k < self._next:
            self._stream.stats.clear()  # counted again from the start of the stream
            self._stream.trained.clear()
            self._batches, self._next = self._all(), 0
        while self._next < k:  # skipped batches are formed (to know where k starts), not collated
            self._count(next(self._batches))
        rows = self._count(next(self._batches))
        return collate_lm(rows, self._pad_id, self._pack)

    def _count(self, rows: list[list[Example]]) -> list[list[Example]]:
        self._next += 1
        for row in rows:
            for ex in row:
                if isinstance(ex, SourcedExample):
                    self._stream.trained[ex.source] += 1
        return rows

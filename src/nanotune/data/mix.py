"""Several sources mixed into one training set: which examples of each source an epoch takes.

The training split of a mix holds every source's examples once, source after source
(`MixPart.examples` of each, in `data.sources` order). An epoch takes an exact number of each
source's examples (`epoch_counts`): a fraction takes that multiple of the source's own count, and
the weighted sources share their total count in proportion to their weights (largest remainder,
so the counts sum exactly). A count above the source's size repeats it whole and samples the
rest; below, it samples. The sampling is seeded by (seed, epoch, source), so an epoch's examples,
and with the batching's shuffle its order, are a pure function of the epoch: a resumed run
continues the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class MixPart:
    """One source of a mix, as counted when it was read."""

    source: str
    rows: int
    """Training rows read from it (after held-out fractions and its limit)."""
    examples: int
    """Training examples it made: its range of the mixed training split."""
    weight: float | None = None
    fraction: float | None = None
    per_epoch: int = 0
    """Examples of it in each epoch (`epoch_counts`); streamed, the examples trained on."""
    streamed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_counts(parts: Sequence[MixPart]) -> list[int]:
    """Examples each source gives an epoch: exact, and the same every epoch."""
    counts = [
        0
        if p.weight is not None
        else round((1.0 if p.fraction is None else p.fraction) * p.examples)
        for p in parts
    ]
    weighted = [i for i, p in enumerate(parts) if p.weight is not None]
    if weighted:
        total = sum(parts[i].examples for i in weighted)
        weights = sum(parts[i].weight for i in weighted)
        shares = [total * parts[i].weight / weights for i in weighted]
        floors = [int(s) for s in shares]
        # Largest remainder: the counts add up to `total` exactly; ties go to the earlier entry.
        by_remainder = sorted(range(len(shares)), key=lambda k: (floors[k] - shares[k], k))
        for k in by_remainder[: total - sum(floors)]:
            floors[k] += 1
        for i, n in zip(weighted, floors, strict=True):
            counts[i] = n
    return counts


def with_counts(parts: Sequence[MixPart]) -> list[MixPart]:
    """The parts with `per_epoch` filled in."""
    counts = epoch_counts(parts)
    return [MixPart(**{**p.to_dict(), "per_epoch": n}) for p, n in zip(parts, counts, strict=True)]


def epoch_indices(parts: Sequence[MixPart], seed: int, epoch: int) -> np.ndarray:
    """Indices into the mixed training split of the examples epoch `epoch` trains on, source by
    source (the batching shuffles them); each source's sample drawn with its own seeded
    generator, so no source's draw moves another's."""
    out, start = [], 0
    for i, (part, count) in enumerate(zip(parts, epoch_counts(parts), strict=True)):
        n = part.examples
        if n and count:
            whole, rest = divmod(count, n)
            rng = np.random.default_rng([seed, epoch, i, 0x6D6978])  # "mix"
            picked = np.sort(rng.choice(n, size=rest, replace=False)) if rest else []
            out.append(start + np.concatenate([np.tile(np.arange(n), whole), picked]))
        start += n
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def epoch_examples(train: Any, parts: Sequence[MixPart], seed: int, epoch: int) -> Any:
    """The examples epoch `epoch` trains on: the whole split, or this epoch's draw of a mix
    (a view of an LM split's store, a list of the others' examples)."""
    if not parts:
        return train
    indices = epoch_indices(parts, seed, epoch)
    return train.take(indices) if hasattr(train, "take") else [train[i] for i in indices]


def interleaved(
    sources: Sequence[Iterator[Any]], weights: Sequence[float], drawn: list[int]
) -> Iterator[Any]:
    """(source index, item) of `sources` (endless iterators) in the shares of `weights`,
    deterministically: the next item comes from the source furthest below its share (smooth
    weighted round robin), so every prefix holds each source's share within one item. `drawn`
    counts each source's items."""
    total = sum(weights)
    shares = [w / total for w in weights]
    while True:
        n = sum(drawn) + 1
        i = max(range(len(sources)), key=lambda k: (n * shares[k] - drawn[k], -k))
        drawn[i] += 1
        yield i, next(sources[i])


def describe(parts: Sequence[MixPart]) -> list[str]:
    """One line per source: examples, and their share of each epoch."""
    total = sum(p.per_epoch for p in parts) or 1
    lines = []
    for i, p in enumerate(parts):
        share = (
            f"weight {p.weight:g}"
            if p.weight is not None
            else f"fraction {1.0 if p.fraction is None else p.fraction:g}"
        )
        each = "trained on" if p.streamed else "an epoch"
        lines.append(
            f"  sources[{i}] {p.source}: {p.examples} examples from {p.rows} rows; "
            f"{p.per_epoch} {each} ({100 * p.per_epoch / total:.1f}%, {share})"
        )
    return lines

"""One epoch's batches, deterministic for (seed, epoch): right-padded to the longest row or packed.

`epoch_batches` returns the whole epoch as a sequence (collated lazily), so a trainer can resume at
batch k and split a global batch across ranks by slicing. Each batch is a dict of tensors
(contract in docs/design.md) plus python ints under keys starting with ``n_``:

  n_examples    examples in the batch
  n_real        real (non-pad) tokens
  n_supervised  positions with a target (LM, preference) or rows with a class label
                (classification)
  n_computed    tokens the model computes (B * T)

so n_real / n_computed is the padding efficiency and n_supervised / n_computed the share of
compute that is trained on (`efficiency` sums them over batches). Move only the tensors to a device.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, overload

import torch

from nanotune.data.example import IGNORE, ClassExample, Example, PreferenceExample, Task
from nanotune.data.store import ExampleStore

MEGA_CHUNK = 50  # batches per sorted chunk in length grouping: enough to group, still shuffled
OPEN_BINS = 64  # sequences kept open while packing; bounds the first-fit search


def _rng(seed: int, epoch: int) -> random.Random:
    # String seeds hash with sha512: the same order on every machine and Python process.
    return random.Random(f"nanotune:{seed}:{epoch}")


def pack_examples(lengths: Sequence[int], order: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices (in `order`) first fit into sequences of <= `max_length` tokens."""
    done: list[list[int]] = []
    open_bins: list[tuple[int, list[int]]] = []  # (tokens used, indices)
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        for b, (used, members) in enumerate(open_bins):
            if used + n <= max_length:
                members.append(i)
                open_bins[b] = (used + n, members)
                break
        else:
            open_bins.append((n, [i]))
            if len(open_bins) > OPEN_BINS:
                done.append(open_bins.pop(0)[1])
    return done + [members for _, members in open_bins]


def _shifted(labels: list[int]) -> list[int]:
    # targets[t] is the label of token t+1; the last token of an example predicts nothing.
    return labels[1:] + [IGNORE]


def collate_lm(rows: Sequence[Sequence[Example]], pad_id: int, packed: bool) -> dict[str, Any]:
    """One LM batch; each row holds one example (padded) or several (packed, with doc_ids)."""
    T = max(sum(len(e.ids) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)  # pads form their own "document"
    n_real = 0
    for b, row in enumerate(rows):
        t = 0
        for d, ex in enumerate(row):
            n = len(ex.ids)
            input_ids[b, t : t + n] = torch.tensor(ex.ids)
            targets[b, t : t + n] = torch.tensor(_shifted(ex.labels))
            positions[b, t : t + n] = torch.arange(n)
            doc_ids[b, t : t + n] = d
            t += n
        n_real += t
    batch: dict[str, Any] = {"input_ids": input_ids, "targets": targets}
    if packed:
        batch.update(positions=positions, doc_ids=doc_ids)
    batch.update(
        n_examples=sum(len(row) for row in rows),
        n_real=n_real,
        n_supervised=int((targets != IGNORE).sum()),
        n_computed=B * T,
    )
    return batch


def collate_class(examples: Sequence[ClassExample], pad_id: int) -> dict[str, Any]:
    """One classification batch: right-padded ids, real lengths, class indices."""
    T = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for b, ex in enumerate(examples):
        input_ids[b, : len(ex.ids)] = torch.tensor(ex.ids)
    lengths = torch.tensor([len(e.ids) for e in examples])
    return {
        "input_ids": input_ids,
        "lengths": lengths,
        "class_labels": torch.tensor([e.label for e in examples]),
        "n_examples": len(examples),
        "n_real": int(lengths.sum()),
        "n_supervised": len(examples),
        "n_computed": input_ids.numel(),
    }


def collate_preference(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, Any]:
    """One preference batch, a row per pair: prompt, then chosen, then rejected, the prompt
    computed once for both (`branch_ids`: the rejected tokens do not see the chosen ones, and
    both responses' positions start where the prompt ends). Slicing rows keeps pairs whole.

    input_ids, positions, branch_ids [B, T]: right-padded (pads are branch 0, after every real
        token, so no real token attends to them).
    targets [B, 2, T]: what position t predicts for the chosen ([:, 0]) and the rejected
        ([:, 1]) response, -100 elsewhere: the prompt's last token predicts the first token of
        both, so the two rows share that position; prompt and pads predict nothing.
    lengths [B]: real tokens of each row; ends [B, 2]: where the chosen and the rejected
        sequence end in it (last index + 1; a reward model scores the token before).
    ref_logps [B, 2]: the reference log-probabilities, when every example carries them.
    """
    T = max(len(e.prompt) + len(e.chosen) + len(e.rejected) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    branch_ids = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, 2, T), IGNORE, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    ends = torch.zeros((B, 2), dtype=torch.long)
    n_supervised = 0
    for b, ex in enumerate(examples):
        p, c, r = len(ex.prompt), len(ex.chosen), len(ex.rejected)
        n = p + c + r
        input_ids[b, :n] = torch.tensor(ex.prompt + ex.chosen + ex.rejected)
        positions[b, :n] = torch.cat((torch.arange(p + c), torch.arange(p, p + r)))
        branch_ids[b, p : p + c], branch_ids[b, p + c : n] = 1, 2
        # Position t predicts token t+1 of its branch: chosen from p - 1 .. p + c - 2; rejected
        # from p - 1, then from its own tokens p + c .. n - 2.
        targets[b, 0, p - 1 : p + c - 1] = torch.tensor(ex.chosen)
        targets[b, 1, p - 1] = ex.rejected[0]
        targets[b, 1, p + c : n - 1] = torch.tensor(ex.rejected[1:])
        lengths[b] = n
        ends[b] = torch.tensor([p + c, n])
        n_supervised += c + r
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "positions": positions,
        "branch_ids": branch_ids,
        "targets": targets,
        "lengths": lengths,
        "ends": ends,
    }
    if all(e.ref_chosen is not None and e.ref_rejected is not None for e in examples):
        batch["ref_logps"] = torch.tensor(
            [[e.ref_chosen, e.ref_rejected] for e in examples], dtype=torch.float32
        )
    n_real = int(lengths.sum())
    batch.update(n_examples=B, n_real=n_real, n_supervised=n_supervised, n_computed=B * T)
    return batch


def _length(example: Example | ClassExample | PreferenceExample) -> int:
    return example.length if isinstance(example, PreferenceExample) else len(example.ids)


def epoch_batches(
    examples: Sequence[Example] | Sequence[ClassExample] | Sequence[PreferenceExample],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    task: Task = "lm",
    pad_id: int,
    pack: bool = False,
    max_length: int | None = None,
    group_by_length: bool = False,
    shuffle: bool = True,
    drop_last: bool = False,
) -> EpochBatches:
    """Every batch of one epoch, each example exactly once (unless `drop_last` drops a short tail),
    collated as it is read (`EpochBatches`).

    task: the data's task (`Datasets.task`): LM, classification or preference batches.
    pack: fill rows of up to `max_length` tokens with several examples (`batch_size` rows a batch).
    group_by_length: sort within chunks of MEGA_CHUNK batches, then shuffle the batch order.
    shuffle=False keeps the given order (evaluation).
    """
    if not examples:
        raise ValueError("no examples to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = _rng(seed, epoch)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    if isinstance(examples, ExampleStore):
        lengths = examples.lengths.tolist()  # without building an Example
    else:
        lengths = [_length(e) for e in examples]
    # Each batch is planned as example indices; its examples are read when it is collated.
    if pack:
        if task != "lm" or max_length is None:
            raise ValueError("packing needs LM examples and max_length")
        rows = pack_examples(lengths, order, max_length)
        chunks: list[list[Any]] = [
            rows[i : i + batch_size] for i in range(0, len(rows), batch_size)
        ]
    else:
        if group_by_length:
            mega = batch_size * MEGA_CHUNK
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])
            ]
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if group_by_length and shuffle:
            rng.shuffle(chunks)
    if drop_last and len(chunks) > 1:
        chunks = [c for c in chunks if len(c) == batch_size]  # at most one is short

    def read(ix: list[int]) -> list[Any]:
        return [examples[i] for i in ix]

    if task == "classification":
        return EpochBatches(chunks, lambda c: collate_class(read(c), pad_id))
    if task == "preference":
        return EpochBatches(chunks, lambda c: collate_preference(read(c), pad_id))
    if pack:
        return EpochBatches(chunks, lambda c: collate_lm([read(row) for row in c], pad_id, True))
    return EpochBatches(chunks, lambda c: collate_lm([[e] for e in read(c)], pad_id, False))


class EpochBatches(Sequence[dict[str, Any]]):
    """One epoch's batches, each collated when it is read: which examples form batch k is
    decided up front (so resuming at k and slicing rows across ranks work as on a list), its
    tensors only when it is used, so an epoch costs no memory beyond its examples."""

    def __init__(self, chunks: list[Any], collate: Callable[[Any], dict[str, Any]]) -> None:
        self._chunks, self._collate = chunks, collate

    def __len__(self) -> int:
        return len(self._chunks)

    @overload
    def __getitem__(self, k: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, k: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, k: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(k, slice):
            return [self._collate(c) for c in self._chunks[k]]
        return self._collate(self._chunks[k])


def efficiency(batches: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Share of computed tokens that are real, and that are supervised, over `batches`."""
    computed = sum(b["n_computed"] for b in batches)
    return {
        "real_fraction": sum(b["n_real"] for b in batches) / computed,
        "supervised_fraction": sum(b["n_supervised"] for b in batches) / computed,
    }

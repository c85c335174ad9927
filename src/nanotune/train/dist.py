"""The few torch.distributed facts the loop needs; single-process when no group is set up.

Every rank builds the same global micro-batch and takes its own rows, so the batch composition
(and the result) does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as td
from torch import Tensor, nn


def _active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if _active() else 0


def world_size() -> int:
    return td.get_world_size() if _active() else 1


def is_main() -> bool:
    """Only rank 0 logs and writes files."""
    return rank() == 0


def all_reduce_sum(x: Tensor) -> Tensor:
    if _active():
        td.all_reduce(x, op=td.ReduceOp.SUM)
    return x


def rank_rows(batch: dict[str, object]) -> dict[str, object]:
    """This rank's contiguous share of a global batch's rows (python ints are global counts)."""
    W = world_size()
    if W == 1:
        return batch
    n = len(batch["input_ids"])
    lo, hi = rank() * n // W, (rank() + 1) * n // W
    return {k: v[lo:hi] for k, v in batch.items() if isinstance(v, Tensor)}


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on inner micro-steps (a no-op without DDP)."""
    if skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def barrier() -> None:
    if _active():
        td.barrier()

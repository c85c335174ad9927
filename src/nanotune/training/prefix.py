"""The outputs of a model's frozen leading blocks, computed once per row and reused.

With `method: last_n` only the last blocks train, so what the blocks before them compute for
a row never changes during the run: every epoch after the first, and every evaluation after
the first, would recompute the same states. A model that can use this (it has a
`cache_frozen_prefix(store)` method; see `SequenceClassifier`) asks a `PrefixStore` for a
micro-batch's states and hands it the ones it had to compute.

Rows are keyed by their tokens (right-padded rows: the real ones, `lengths`), so the same text
in any batch, order or padding finds its states. The states are the ones the model computed,
kept as they are: a run that reads them trains on exactly the values it would recompute from
the same batch. They sit in RAM up to a budget, then in a file in the run directory read
through a memory map; the file is removed when the run ends.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def available_memory() -> int:
    """Bytes of memory the system can give without swapping (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PrefixStore:
    """Per-row states [length, C] keyed by the row's tokens: in RAM up to `ram_bytes`, then
    appended to `spill_path` (created on first use, deleted by `close`)."""

    def __init__(self, ram_bytes: int, spill_path: Path) -> None:
        self.ram_bytes = ram_bytes
        self.spill_path = Path(spill_path)
        self._ram: dict[bytes, Tensor] = {}
        self._disk: dict[bytes, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._file = None
        self._map: np.memmap | None = None
        self.held = 0  # bytes in RAM
        self.spilled = 0  # bytes in the file
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    @staticmethod
    def _keys(input_ids: Tensor, lengths: Tensor) -> list[bytes]:
        ids, ends = input_ids.cpu().numpy(), lengths.cpu().tolist()
        return [ids[b, :n].tobytes() for b, n in enumerate(ends)]

    def get(self, input_ids: Tensor, lengths: Tensor) -> Tensor | None:
        """The stored states of every row as one right-padded [B, T, C] tensor on input_ids'
        device (zeros past each row's length), or None when any row has none yet."""
        keys = self._keys(input_ids, lengths)
        if not all(k in self._ram or k in self._disk for k in keys):
            self.misses += 1
            return None
        self.hits += 1
        rows = [self._row(k) for k in keys]
        B, T = input_ids.shape
        out = rows[0].new_zeros(B, T, rows[0].shape[-1])
        for b, row in enumerate(rows):
            out[b, : len(row)] = row
        return out.to(input_ids.device, non_blocking=True)

    def put(self, input_ids: Tensor, lengths: Tensor, states: Tensor) -> None:
        """Keep `states` [B, T, C] of each row up to its length (rows already held are skipped)."""
        for b, (key, n) in enumerate(
            zip(self._keys(input_ids, lengths), lengths.tolist(), strict=True)
        ):
            if key in self._ram or key in self._disk:
                continue
            row = states[b, :n].detach().to("cpu", copy=True).contiguous()
            size = row.numel() * row.element_size()
            if self.held + size <= self.ram_bytes:
                self._ram[key] = row
                self.held += size
            else:
                self._spill(key, row, size)

    def _spill(self, key: bytes, row: Tensor, size: int) -> None:
        if self._file is None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.spill_path, "wb")  # noqa: SIM115 - kept open for the run
        self._file.write(row.view(torch.uint8).numpy().tobytes())
        self._disk[key] = (self.spilled, tuple(row.shape), row.dtype)
        self.spilled += size

    def _row(self, key: bytes) -> Tensor:
        if key in self._ram:
            return self._ram[key]
        offset, shape, dtype = self._disk[key]
        size = int(np.prod(shape)) * dtype.itemsize
        if self._map is None or offset + size > len(self._map):
            self._file.flush()
            self._map = np.memmap(self.spill_path, dtype=np.uint8, mode="r")
        raw = torch.from_numpy(np.array(self._map[offset : offset + size]))
        return raw.view(dtype).view(shape)

    def describe(self) -> str:
        where = f"{self.held / 2**20:,.0f} MiB in RAM"
        if self.spilled:
            where += f", {self.spilled / 2**20:,.0f} MiB in {self.spill_path.name}"
        return (
            f"{len(self):,} rows ({where}); "
            f"{self.hits:,} micro-batches read, {self.misses:,} computed"
        )

    def close(self) -> None:
        """Drop every state and delete the spill file."""
        self._ram.clear()
        self._disk.clear()
        self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.spill_path.exists():
            os.unlink(self.spill_path)

"""Tokenized LM data kept on disk, so a second run on the same data starts without tokenizing.

An entry is keyed by everything the examples depend on: the data options (`DataConfig`), each
source's files (their content), the tokenizer (the files it saves) and the
nanotune version. It holds each split's `ExampleStore` arrays as .npy files, opened memory-mapped,
and the counts and tokenizer changes (added markers, chat template) the build made. Hub datasets
(`hf:`) are not cached here (the hub's own cache keeps them); neither are classification or
preference sets, which are small. Where: $NANOTUNE_DATA_CACHE, else ~/.cache/nanotune/data
(`$XDG_CACHE_HOME`); `NANOTUNE_DATA_CACHE=off` turns it off. An unreadable entry is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from nanotune.data.config import DataConfig
from nanotune.data.store import ExampleStore
from nanotune.files.atomic import atomic_dir
from nanotune.version import __version__

FORMAT = 2  # bump when the entry layout or the examples a config makes change


def cache_root() -> Path | None:
    """Where entries live, or None when caching is off."""
    where = os.environ.get("NANOTUNE_DATA_CACHE")
    if where is not None:
        return None if where.lower() in ("", "0", "off", "false", "no") else Path(where)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanotune" / "data"


def _vouched(spec: str) -> bool:
    """Sources whose content this cache can identify: builtins and local files or folders
    (not hub ids or saved datasets by split name, which have caches of their own)."""
    return spec.startswith("builtin:") or Path(spec).expanduser().exists()


def _keeps(cfg: DataConfig, tokenizer: Any) -> bool:
    """LM data from sources this cache can identify, with a tokenizer it can fingerprint."""
    return (
        cfg.format not in ("classification", "preference")
        and getattr(tokenizer, "fingerprint", None) is not None
        and all(
            spec is None or _vouched(spec)
            for spec in (cfg.source, cfg.val_source, cfg.test_source)
        )
    )


def cacheable(cfg: DataConfig, tokenizer: Any) -> bool:
    """Whether `build_datasets` would read or write an entry for this data (reads no file)."""
    return cache_root() is not None and _keeps(cfg, tokenizer)


def _source_fingerprint(spec: str) -> list[Any]:
    """What identifies a (vouched) source's content: its files' names and content digests
    (~1 GB/s), or the builtin's name."""
    if spec.startswith("builtin:"):
        return [spec]
    path = Path(spec).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out: list[Any] = []
    for p in files:
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        out.append([str(p.relative_to(path)) if p != path else p.name, h.hexdigest()])
    return out


def cache_key(cfg: DataConfig, tokenizer: Any) -> str | None:
    """The entry's name for this data and tokenizer, or None when it cannot be cached."""
    if not _keeps(cfg, tokenizer):
        return None
    sources = [
        None if spec is None else _source_fingerprint(spec)
        for spec in (cfg.source, cfg.val_source, cfg.test_source)
    ]
    blob = json.dumps(
        [FORMAT, __version__, dataclasses.asdict(cfg), sources, tokenizer.fingerprint()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(root: Path, key: str) -> dict[str, Any] | None:
    """The entry's splits (memory-mapped stores) and metadata, or None when absent or unreadable."""
    entry = root / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        splits = {
            name: ExampleStore(
                np.load(entry / f"{name}.ids.npy", mmap_mode="r"),
                np.load(entry / f"{name}.supervised.npy", mmap_mode="r"),
                np.load(entry / f"{name}.offsets.npy", mmap_mode="r"),
            )
            for name in meta["splits"]
        }
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # damaged: rebuilt, and written anew
        shutil.rmtree(entry, ignore_errors=True)
        return None
    meta["stats"] = {name: Counter(c) for name, c in meta["stats"].items()}
    return {**meta, "splits": splits, "entry": entry}


def save(root: Path, key: str, splits: dict[str, ExampleStore], meta: dict[str, Any]) -> Path:
    """Write an entry whole (`files.atomic.atomic_dir`): a reader never sees half of one."""

    def write(tmp: Path) -> None:
        for name, store in splits.items():
            offsets = np.zeros(len(store) + 1, dtype=np.int64)
            np.cumsum(store.lengths, out=offsets[1:])
            # Each split's tokens in its own order, written a block at a time (a split is a
            # view of its source's tokens: never copied whole in memory, nor mapped to write).
            with (
                open(tmp / f"{name}.ids.npy", "wb") as ids,
                open(tmp / f"{name}.supervised.npy", "wb") as supervised,
            ):
                for f, dtype in ((ids, np.int32), (supervised, np.bool_)):
                    header = {"descr": np.dtype(dtype).str, "fortran_order": False}
                    np.lib.format.write_array_header_1_0(f, {**header, "shape": (int(offsets[-1]),)})
                for block_ids, block_supervised in store.blocks():
                    block_ids.astype(np.int32, copy=False).tofile(ids)
                    block_supervised.astype(np.bool_, copy=False).tofile(supervised)
            np.save(tmp / f"{name}.offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps({"splits": list(splits), **meta}))

    return atomic_dir(root / key, write, kind="data-cache", what="data cache entry")

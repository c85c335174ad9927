"""Tokenized LM data kept on disk, so a second run on the same data starts without tokenizing.

An entry is keyed by everything the examples depend on: the data options (`DataConfig`), each
source's files (their content), the tokenizer (the files it saves) and the nanotune version. It
holds each split's `ExampleStore` arrays as .npy files, opened memory-mapped, and the counts and
tokenizer changes (added markers, chat template) the build made. Hub datasets (`hf:`) are not
cached here (the hub's own cache keeps them), nor streams (data.streaming); neither are
classification or preference sets, which are small. Nor are rows handed to
`nanotune.train(data=...)`: a digest of Python rows would need a faithful serialization of any
value a row may hold (numpy arrays print abbreviated, objects print their id), and a collision
trains on another data set's tokens without
a word; the rows are in memory already, so only the tokenizing is repeated. Where:
$NANOTUNE_DATA_CACHE, else ~/.cache/nanotune/data (`$XDG_CACHE_HOME`); `NANOTUNE_DATA_CACHE=off`
turns it off.

An entry is checked before it is trusted, as a checkpoint is: each file's digest is stored with it
(checksums.json) and compared on every load, so token ids or a chat template edited in place, a
file cut short or emptied are never trained on or shipped; such an entry is rebuilt, with a note.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from nanotune.data.config import DataConfig
from nanotune.data.formats import FORMATS
from nanotune.data.sources import PYTHON
from nanotune.data.store import ExampleStore
from nanotune.files.atomic import atomic_dir
from nanotune.version import __version__

FORMAT = 5  # bump when the entry layout or the examples a config makes change
CHECKSUMS = "checksums.json"


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
    if spec.startswith(PYTHON):
        return False
    return spec.startswith("builtin:") or Path(spec).expanduser().exists()


def _specs(cfg: DataConfig) -> list[str | None]:
    """Every source string the data reads: the source or each of data.sources, then val, test."""
    train = [s.source for s in cfg.sources] if cfg.sources else [cfg.source]
    return [*train, cfg.val_source, cfg.test_source]


def _keeps(cfg: DataConfig, tokenizer: Any) -> bool:
    """LM data from sources this cache can identify, with a tokenizer it can fingerprint (a
    stream is never kept: it is read as it trains, for data that does not fit on disk)."""
    formats = [cfg.source_config(i).format for i in range(len(cfg.sources))] or [cfg.format]
    return (
        not cfg.streaming
        and all(FORMATS[f].cacheable for f in formats)
        and getattr(tokenizer, "fingerprint", None) is not None
        and all(spec is None or _vouched(spec) for spec in _specs(cfg))
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
    # dataclasses.asdict(cfg) holds data.sources whole (weights, fractions, options, order).
    sources = [None if spec is None else _source_fingerprint(spec) for spec in _specs(cfg)]
    blob = json.dumps(
        [FORMAT, __version__, dataclasses.asdict(cfg), sources, tokenizer.fingerprint()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _digest(path: Path) -> str:
    """blake2b of the file's bytes, hashed from its memory map (no copy).

    What checking costs (measured on 2 busy cores, entry in the page cache): a 50M-token entry
    (250 MB) loads in 0.3-0.55 s checked, ~1 ms unchecked, against ~4 min to tokenize it again
    (200k tokens/s, SmolLM2 chat rows). blake2b hashes 0.8 GB/s on any x86 CPU; sha256 (what
    checkpoints use) 1.4 GB/s where the CPU has SHA instructions but 0.4 GB/s where it does not.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # an empty file cannot be mapped
            return hashlib.blake2b(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.blake2b(mapped).hexdigest()


class _Damaged(Exception):
    pass


def _verify(entry: Path) -> None:
    """Raise _Damaged naming the first file that differs from the digest written with it."""
    try:
        sums = json.loads((entry / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        raise _Damaged(f"{CHECKSUMS}: {e.__class__.__name__}") from e
    if not isinstance(sums, dict) or "meta.json" not in sums:
        raise _Damaged(f"{CHECKSUMS} lists no meta.json")
    for name, want in sums.items():
        try:
            same = _digest(entry / name) == want
        except OSError as e:
            raise _Damaged(f"{name}: {e.strerror or e}") from e
        if not same:
            raise _Damaged(f"{name} differs from the file written")


def load(root: Path, key: str, *, verify: bool = True) -> dict[str, Any] | None:
    """The entry's splits (memory-mapped stores) and metadata, or None when absent or damaged.

    Every file is checked against its digest first (`verify`; skipped only for an entry this
    process has just written); a damaged entry is deleted, with a note, to be built anew.
    """
    entry = root / key
    if not entry.is_dir():
        return None
    try:
        if verify:
            _verify(entry)
        meta = json.loads((entry / "meta.json").read_text())
        splits = {
            name: ExampleStore(
                np.load(entry / f"{name}.ids.npy", mmap_mode="r"),
                np.load(entry / f"{name}.supervised.npy", mmap_mode="r"),
                np.load(entry / f"{name}.offsets.npy", mmap_mode="r"),
            )
            for name in meta["splits"]
        }
        meta["stats"] = {name: Counter(c) for name, c in meta["stats"].items()}
    except (_Damaged, OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as e:
        why = str(e) if isinstance(e, _Damaged) else f"{e.__class__.__name__}: {e}"
        print(f"note: data cache entry {entry} is damaged ({why}); building it anew")
        shutil.rmtree(entry, ignore_errors=True)
        return None
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
                    np.lib.format.write_array_header_1_0(
                        f, {**header, "shape": (int(offsets[-1]),)}
                    )
                for block_ids, block_supervised in store.blocks():
                    block_ids.astype(np.int32, copy=False).tofile(ids)
                    block_supervised.astype(np.bool_, copy=False).tofile(supervised)
            np.save(tmp / f"{name}.offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps({"splits": list(splits), **meta}))
        sums = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))

    return atomic_dir(root / key, write, kind="data-cache", what="data cache entry")

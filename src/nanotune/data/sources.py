"""Sources: files, folders, builtin and Hugging Face datasets -> rows that remember where they came from.

A row is a plain dict (`Row`) with a `where` attribute such as ``"train.jsonl:12"`` so every later
error can name the file and line. Reading is strict: a row that cannot be read raises `BadRow`,
which the pipeline turns into an error or a counted skip (`on_bad_row`).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nanotune.errors import NanotuneError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}


class Row(dict):
    """One record: its fields, plus `where` (file and line/row) for error messages."""

    def __init__(self, fields: dict[str, Any], where: str) -> None:
        super().__init__(fields)
        self.where = where


class BadRow(NanotuneError):
    """A row that cannot be read or formatted; the message starts with its file and line/row."""


def _check_utf8(value: Any, where: str) -> None:
    # Files are decoded with surrogateescape so a bad byte fails its own row, not the whole file.
    if isinstance(value, str):
        if any("\udc80" <= ch <= "\udcff" for ch in value):
            raise BadRow(f"{where}: not valid UTF-8; re-encode the file as UTF-8")
    elif isinstance(value, dict):
        for v in value.values():
            _check_utf8(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_utf8(v, where)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise NanotuneError(
            f"{path}: cannot read ({e.strerror}); check the data source path"
        ) from e


def _object_row(obj: object, where: str, expected: str) -> Row | BadRow:
    """A JSON value as a row: it must be an object whose strings are valid UTF-8."""
    if not isinstance(obj, dict):
        return BadRow(f"{where}: expected {expected}, got {type(obj).__name__}")
    try:
        _check_utf8(obj, where)
    except BadRow as e:
        return e
    return Row(obj, where)


def _jsonl(path: Path) -> Iterator[Row | BadRow]:
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRow(
                f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line"
            )
            continue
        yield _object_row(obj, where, "a JSON object per line")


def _json(path: Path) -> Iterator[Row | BadRow]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise NanotuneError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg}); a .json source must be one valid list of objects"
        ) from e
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers are common
    if not isinstance(data, list):
        raise NanotuneError(
            f"{path}: expected a JSON list of objects; use .jsonl for one object per line"
        )
    for n, obj in enumerate(data):
        yield _object_row(obj, f"{path}: item {n}", "an object")


def _csv(path: Path) -> Iterator[Row | BadRow]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                yield BadRow(
                    f"{where}: {len(record)} fields but the header has {len(header)}; "
                    "quote fields that contain the delimiter"
                )
                continue
            row = Row(dict(zip(header, record, strict=True)), where)
            try:
                _check_utf8(row, where)
            except BadRow as e:
                yield e
                continue
            yield row


def _parquet(path: Path) -> Iterator[Row | BadRow]:
    if importlib.util.find_spec("pyarrow") is None:
        raise NanotuneError(
            f"{path}: reading parquet needs pyarrow; pip install 'nanotune[datasets]'"
        )
    import pyarrow.parquet as pq

    for n, obj in enumerate(pq.read_table(path).to_pylist()):
        yield Row(obj, f"{path}: row {n}")


def _text(path: Path, unit: str) -> Iterator[Row | BadRow]:
    text = _read_text(path)
    if unit == "file":
        pieces = [(1, text)]
    elif unit == "line":
        pieces = list(enumerate(text.splitlines(), start=1))
    else:  # paragraph: blank-line separated, numbered by first line
        pieces, start, buf = [], 1, []
        for n, line in enumerate(text.splitlines() + [""], start=1):
            if line.strip():
                if not buf:
                    start = n
                buf.append(line)
            elif buf:
                pieces.append((start, "\n".join(buf)))
                buf = []
    for n, piece in pieces:
        if not piece.strip():
            continue
        where = f"{path}:{n}"
        try:
            _check_utf8(piece, where)
        except BadRow as e:
            yield e
            continue
        yield Row({"text": piece}, where)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def _file_rows(path: Path, text_unit: str) -> Iterator[Row | BadRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".json":
        return _json(path)
    if suffix in (".csv", ".tsv"):
        return _csv(path)
    if suffix == ".parquet":
        return _parquet(path)
    if suffix in TEXT_SUFFIXES:
        return _text(path, text_unit)
    raise NanotuneError(
        f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .tsv, .parquet or .txt"
    )


def _split_suffix(spec: str) -> tuple[str, str | None]:
    name, sep, split = spec.partition(":")
    return (name, split) if sep else (spec, None)


def _require_datasets(what: str) -> Any:
    if importlib.util.find_spec("datasets") is None:
        raise NanotuneError(
            f"{what} needs the `datasets` package; pip install 'nanotune[datasets]'"
        )
    import datasets

    return datasets


def _hf_rows(table: Any, label: str) -> Iterator[Row | BadRow]:
    for n, obj in enumerate(table):
        yield Row(dict(obj), f"{label}: row {n}")


def _saved_dataset(path: Path, split: str | None) -> Iterator[Row | BadRow]:
    datasets = _require_datasets(f"{path} (a datasets.save_to_disk folder)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise NanotuneError(
                f"{path}: no split {split!r}; it has {', '.join(ds)} (write {path}:<split>)"
            )
        ds = ds[split]
    return _hf_rows(ds, f"{path}[{split or 'all'}]")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe so an offline machine fails at once instead of retrying for minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_dataset(dataset_id: str, split: str | None, config: str | None) -> Iterator[Row | BadRow]:
    datasets = _require_datasets(f"Hugging Face dataset {dataset_id!r}")
    split = split or "train"
    online = _hub_reachable()
    import huggingface_hub.constants

    flags = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if not online:
        # Offline: only a copy already in the local datasets cache can be used (no retry loops).
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, bad config)
        why = (
            "the hub is unreachable and it is not in the local cache"
            if not online
            else str(e).splitlines()[0]
        )
        raise NanotuneError(
            f"hf:{dataset_id}:{split}: cannot load ({why}); download it where the hub is reachable and "
            "point data.source at local files (.jsonl/.csv/.parquet) or a datasets.save_to_disk folder"
        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = flags
    return _hf_rows(ds, f"hf:{dataset_id}:{split}")


def iter_source(
    spec: str, text_unit: str = "file", hf_config: str | None = None
) -> Iterator[Row | BadRow]:
    """Rows of one source string (see `DataConfig`); unreadable rows are yielded as `BadRow`s."""
    if spec.startswith("builtin:"):
        from nanotune.data.builtin import BUILTINS

        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise NanotuneError(
                f"{spec}: no such builtin source; choose one of {', '.join(sorted(BUILTINS))}"
            )
        return BUILTINS[name]()
    if spec.startswith("hf:"):
        dataset_id, split = _split_suffix(spec.removeprefix("hf:"))
        return _hub_dataset(dataset_id, split, hf_config)
    path = Path(spec).expanduser()
    if not path.exists():
        base, split = _split_suffix(spec)
        if split is not None and _is_saved_dataset(Path(base)):
            return _saved_dataset(Path(base), split)
        if spec.count("/") == 1 and not spec.startswith((".", "/")) and Path(spec).suffix == "":
            return _hub_dataset(base, split, hf_config)
        raise NanotuneError(f"{spec}: no such file or folder; check data.source (or write hf:<id>)")
    if _is_saved_dataset(path):
        return _saved_dataset(path, None)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES | TEXT_SUFFIXES
        )
        if not files:
            raise NanotuneError(f"{path}: folder has no .jsonl/.json/.csv/.tsv/.parquet/.txt files")
        return (row for f in files for row in _file_rows(f, text_unit))
    return _file_rows(path, text_unit)


def split_rows(
    rows: list[Row],
    fractions: dict[str, float],
    seed: int,
    stratify_by: Callable[[Row], Any] | None = None,
) -> dict[str, list[Row]]:
    """Hold out fractions of `rows` (e.g. {"val": 0.1}); the rest is "train". Same seed, same split.

    With `stratify_by`, each class is split on its own so every split keeps the class shares.
    """
    if not fractions:
        return {"train": rows}  # nothing held out: keep the file order
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        groups.setdefault(stratify_by(row) if stratify_by else None, []).append(row)
    out: dict[str, list[Row]] = {"train": [], **{name: [] for name in fractions}}
    rng = random.Random(seed)
    for key in sorted(groups, key=repr):
        group = groups[key][:]
        rng.shuffle(group)
        start = 0
        for name, frac in fractions.items():
            n = round(len(group) * frac)
            out[name].extend(group[start : start + n])
            start += n
        out["train"].extend(group[start:])
    # Interleave classes again so a split is not sorted by label.
    for name in out:
        rng.shuffle(out[name])
    return out


def balance_rows(rows: list[Row], key: Callable[[Row], Any], seed: int) -> list[Row]:
    """Down-sample every class to the size of the smallest (keeping file order within a class)."""
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(key(row), []).append(i)
    n = min(len(g) for g in groups.values())
    rng = random.Random(seed)
    keep = sorted(i for k in sorted(groups, key=repr) for i in rng.sample(groups[k], n))
    return [rows[i] for i in keep]

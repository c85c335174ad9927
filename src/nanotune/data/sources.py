"""Sources: files, folders, builtin and Hugging Face datasets, Python objects -> rows that
remember where they came from.

A row is a plain dict (`Row`) with a `where` attribute such as ``"train.jsonl:12"`` (a 1-based
line; parquet and datasets rows are named by 0-based index, ``"x.parquet: row 0"``) so every later
error can name the file and line. Reading is strict: a row that cannot be read raises `BadRow`,
which the pipeline turns into an error or a counted skip (`on_bad_row`); a file that cannot be
read at all, or whose rows cannot be told apart (a quote that swallows lines), is a NanotuneError.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
import os
import random
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nanotune.data.example import BadRow, Row
from nanotune.errors import NanotuneError

# Extension -> file_format; `data.file_format` names the format of any other file.
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes


def _check_utf8(value: Any, where: str) -> None:
    # Files are decoded with surrogateescape so a bad byte fails its own row, not the whole file.
    if isinstance(value, str):
        if _NOT_UTF8.search(value):
            raise BadRow(f"{where}: not valid UTF-8; re-encode the file as UTF-8")
    elif isinstance(value, dict):
        for v in value.values():
            _check_utf8(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_utf8(v, where)


def _check_file(path: Path, fmt: str) -> None:
    """One clear error for a file that holds no `fmt` rows at all: empty, UTF-16, or binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise NanotuneError(
            f"{path}: cannot read ({e.strerror}); check the data source path"
        ) from e
    if not head:
        raise NanotuneError(f"{path}: the file is empty; check data.source")
    if fmt == "parquet":
        return
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # also UTF-32 LE's BOM
        raise NanotuneError(
            f"{path}: UTF-16 text; re-encode it as UTF-8 (iconv -f UTF-16 -t UTF-8 in > out)"
        )
    if b"\0" in head:
        line = head.count(b"\n", 0, head.index(b"\0")) + 1
        raise NanotuneError(
            f"{path}:{line}: binary data (a NUL byte), not {fmt} text; check data.source, or set "
            "data.file_format to the file's real format"
        )


def _read_text(path: Path) -> str:
    try:  # utf-8-sig: a BOM (Excel, Notepad) is not part of the first column's name
        return path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise NanotuneError(
            f"{path}: cannot read ({e.strerror}); check the data source path"
        ) from e


def _read_lines(path: Path) -> Iterator[str]:
    """The file's lines as they are read, never the whole file at once; a line ends at \\n,
    \\r\\n or \\r (a JSON string may hold U+2028, which `str.splitlines` would split at)."""
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
            for line in f:
                yield line.removesuffix("\n")
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
    for n, line in enumerate(_read_lines(path), start=1):
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


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _item_lines(text: str, wrapped: bool) -> list[int]:
    """The 1-based line where each item of the (valid) JSON list in `text` starts; `wrapped`: the
    list is the one value of a top-level object."""
    decode = json.JSONDecoder().raw_decode
    i = _JSON_SPACE.match(text).end()
    if wrapped:  # skip '{', the key and ':'
        _, i = decode(text, _JSON_SPACE.match(text, i + 1).end())
        i = _JSON_SPACE.match(text, _JSON_SPACE.match(text, i).end() + 1).end()
    i += 1  # '['
    lines, line, counted = [], 1, 0
    while True:
        i = _JSON_SPACE.match(text, i).end()
        if text[i] == "]":
            return lines
        line += text.count("\n", counted, i)
        counted = i
        lines.append(line)
        _, i = decode(text, i)
        i = _JSON_SPACE.match(text, i).end()
        if text[i] == ",":
            i += 1


def _json(path: Path) -> Iterator[Row | BadRow]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NanotuneError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg}); "
            "a .json source must be one valid list of objects"
        ) from e
    wrapped = (
        isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list)
    )
    if wrapped:
        data = next(iter(data.values()))  # {"data": [...]} wrappers are common
    if not isinstance(data, list):
        raise NanotuneError(
            f"{path}: expected a JSON list of objects; use .jsonl for one object per line"
        )
    for line, obj in zip(_item_lines(text, wrapped), data, strict=True):
        yield _object_row(obj, f"{path}:{line}", "an object")


def _csv(path: Path, delimiter: str, header: bool, quoting: str) -> Iterator[Row | BadRow]:
    """Rows of a csv/tsv file; with `header` false, columns are named "1", "2", ..."""
    sep = "tab" if delimiter == "\t" else "comma"
    tsv_hint = " if the file is tab-separated set data.file_format: tsv;" if sep == "comma" else ""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(
            f,
            delimiter=delimiter,
            quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL,
            strict=True,  # text after a closing quote is an error, not glued into the field
        )
        names = None
        while True:
            n = reader.line_num + 1  # the line this record starts on
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if quoting == "none":  # nothing is quoted: only a field over csv's size limit
                    raise NanotuneError(f"{path}:{n}: {e}") from e
                raise NanotuneError(
                    f"{path}:{n}: a '\"' in the row starting on this line does not close its field "
                    f"({e}), so the lines after it would merge into one row;{tsv_hint} if '\"' is "
                    "plain text set data.quoting: none, else fix the quote"
                ) from e
            if reader.line_num > n and quoting != "multiline":
                # A field spans lines: almost always an unclosed quote merging the rows after it.
                raise NanotuneError(
                    f"{path}:{n}: a quoted field starting on this line runs to line "
                    f"{reader.line_num}, merging {reader.line_num - n + 1} lines into one row;"
                    f"{tsv_hint} if '\"' is plain text set data.quoting: none; if fields really "
                    "contain line breaks set data.quoting: multiline"
                )
            if not any(cell.strip() for cell in record):
                continue
            where = f"{path}:{n}"
            tabs = sep == "comma" and any("\t" in cell for cell in record)
            if names is None:
                if header and tabs:  # no real header names a column with a tab in it
                    raise NanotuneError(
                        f"{where}: the header has tabs inside column names; for a tab-separated "
                        "file set data.file_format: tsv"
                    )
                names = record if header else [str(i) for i in range(1, len(record) + 1)]
                twice = sorted({c for c in names if names.count(c) > 1})
                if twice:
                    raise NanotuneError(
                        f"{where}: the header names column(s) {', '.join(map(repr, twice))} more "
                        "than once; rename them"
                    )
                if header:
                    continue
            if len(record) != len(names):
                fix = (
                    f"quote fields that contain a {sep}"
                    if quoting != "none"
                    else f"a field holding a {sep} must be quoted, with data.quoting: csv"
                )
                if tabs:
                    fix += "; if the file is tab-separated set data.file_format: tsv"
                yield BadRow(
                    f"{where}: {len(record)} fields but the "
                    f"{'header' if header else 'first row'} has {len(names)}; {fix}"
                )
                continue
            row = Row(dict(zip(names, record, strict=True)), where)
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NanotuneError(
            f"{path}: not a readable Parquet file ({why}); check the file, or set data.file_format "
            "to its real format"
        ) from e
    for n, obj in enumerate(table.to_pylist()):
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
        bad = _NOT_UTF8.search(piece)
        if bad:  # name the line of the bad byte, not the first line of the document
            line = n + piece.count("\n", 0, bad.start())
            yield BadRow(f"{path}:{line}: not valid UTF-8; re-encode the file as UTF-8")
            continue
        yield Row({"text": piece}, f"{path}:{n}")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def _file_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        return file_format
    suffix = path.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    what = f"unknown extension {suffix!r}" if suffix else "no extension"
    raise NanotuneError(
        f"{path}: {what}; set data.file_format to one of csv, tsv, jsonl, json, parquet, text "
        "(or rename it to .csv, .tsv, .jsonl, .json, .parquet or .txt)"
    )


def _file_rows(
    path: Path, file_format: str | None, text_unit: str, header: bool, quoting: str | None
) -> Iterator[Row | BadRow]:
    fmt = _file_format(path, file_format)
    _check_file(path, fmt)
    if fmt in ("csv", "tsv"):
        # Tab-separated files rarely quote: a stray '"' there is text, not a quote.
        quoting = quoting or ("csv" if fmt == "csv" else "none")
        return _csv(path, "," if fmt == "csv" else "\t", header, quoting)
    readers = {"jsonl": _jsonl, "json": _json, "parquet": _parquet}
    return readers[fmt](path) if fmt in readers else _text(path, text_unit)


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


def _hub_dataset(
    dataset_id: str, split: str | None, config: str | None, streaming: bool = False
) -> Iterator[Row | BadRow]:
    datasets = _require_datasets(f"Hugging Face dataset {dataset_id!r}")
    split = split or "train"
    online = _hub_reachable()
    import huggingface_hub.constants

    flags = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if not online:
        # Offline: only a copy already in the local datasets cache can be used (no retry loops).
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        # streaming: a datasets IterableDataset, its rows fetched as they are read.
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (connection, not found, bad config)
        why = (
            "the hub is unreachable and it is not in the local cache"
            if not online
            else str(e).splitlines()[0]
        )
        raise NanotuneError(
            f"hf:{dataset_id}:{split}: cannot load ({why}); download it where the hub is reachable "
            "and point data.source at local files (.jsonl/.csv/.parquet) or a "
            "datasets.save_to_disk folder"
        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = flags
    return _hf_rows(ds, f"hf:{dataset_id}:{split}")


def iter_source(
    spec: str,
    text_unit: str = "file",
    hf_config: str | None = None,
    *,
    file_format: str | None = None,
    header: bool = True,
    quoting: str | None = None,
    streaming: bool = False,
) -> Iterator[Row | BadRow]:
    """Rows of one source string; the options are `DataConfig`'s fields of the same names.
    Unreadable rows are yielded as `BadRow`s. Files are read as the rows are asked for;
    `streaming` also streams a hub dataset (instead of downloading it first)."""
    if spec.startswith(PYTHON):
        raise NanotuneError(
            f"{spec}: names rows handed to nanotune.train(config, data=...), and none were; pass "
            "them again, or point data.source at a file"
        )
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
        return _hub_dataset(dataset_id, split, hf_config, streaming)
    path = Path(spec).expanduser()
    if not path.exists():
        base, split = _split_suffix(spec)
        if split is not None and _is_saved_dataset(Path(base)):
            return _saved_dataset(Path(base), split)
        if spec.count("/") == 1 and not spec.startswith((".", "/")) and Path(spec).suffix == "":
            return _hub_dataset(base, split, hf_config, streaming)
        raise NanotuneError(f"{spec}: no such file or folder; check data.source (or write hf:<id>)")
    if _is_saved_dataset(path):
        return _saved_dataset(path, None)
    options = (file_format, text_unit, header, quoting)
    if path.is_dir():
        # Hidden files and folders (.ipynb_checkpoints, .DS_Store) are never data; with a
        # file_format every other file is read in it, else files with a known extension.
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (file_format is not None or p.suffix.lower() in SUFFIX_FORMATS)
        )
        if not files:
            raise NanotuneError(
                f"{path}: folder has no data files (.jsonl, .json, .csv, .tsv, .parquet, .txt, "
                ".md); point data.source at a file, or set data.file_format to read other names"
            )
        return (row for f in files for row in _file_rows(f, *options))
    return _file_rows(path, *options)


# data.source of the rows of a split given to `nanotune.train(config, data={split: rows})`.
PYTHON = "python:"
PYTHON_SPLITS = {"train": "source", "val": "val_source", "eval": "val_source"}
PYTHON_SPLITS |= {"validation": "val_source", "test": "test_source"}


def python_sources(data: Any) -> dict[str, Any]:
    """The sources of `nanotune.train(data=...)`: {"python:<split>": rows}, checked before any
    model is loaded. Each split's rows: a list of dicts, a `datasets.Dataset` (or
    IterableDataset) or a pandas DataFrame."""
    if not isinstance(data, Mapping) or "train" not in data:
        raise NanotuneError(
            'data: give a mapping of splits to rows, e.g. data={"train": rows, "eval": rows2}'
        )
    fields: dict[str, str] = {}
    for split, rows in data.items():
        if split not in PYTHON_SPLITS:
            raise NanotuneError(
                f"data[{split!r}]: not a split; use {', '.join(map(repr, PYTHON_SPLITS))}"
            )
        if PYTHON_SPLITS[split] in fields:
            raise NanotuneError(
                f"data: {fields[PYTHON_SPLITS[split]]!r} and {split!r} "
                "are both the validation split"
            )
        fields[PYTHON_SPLITS[split]] = split
        _records(rows, split)  # refuses what is not rows now, not after the model loads
    return {PYTHON + split: rows for split, rows in data.items()}


def _is_pandas(obj: Any) -> bool:
    # Duck-typed: pandas is not a dependency, only read when a DataFrame is handed in.
    return type(obj).__module__.startswith("pandas") and hasattr(obj, "to_dict")


def _records(obj: Any, split: str) -> Any:
    """What to iterate for a split's rows; each pass of it reads them again."""
    if _is_pandas(obj):
        if not hasattr(obj, "columns"):
            raise NanotuneError(f"data[{split!r}]: a pandas Series is not rows; pass a DataFrame")
        # A missing value (NaN, NA) is None, as in a JSON file: never the text "nan".
        return obj.astype(object).where(obj.notna(), None).to_dict(orient="records")
    if isinstance(obj, (Mapping, str, bytes)) or not hasattr(obj, "__iter__") or iter(obj) is obj:
        raise NanotuneError(
            f"data[{split!r}]: a {type(obj).__name__} is not rows; pass a list of dicts, a "
            "datasets.Dataset or a pandas DataFrame "
            "(an iterator is read more than once: use a list)"
        )
    return obj


def python_rows(spec: str, obj: Any) -> Iterator[Row | BadRow]:
    """The rows of a split given in Python, each named `data["<split>"][<index>]`."""
    split = spec.removeprefix(PYTHON)
    for n, item in enumerate(_records(obj, split)):
        row = dict(item) if isinstance(item, Mapping) else item  # never the caller's dict
        yield _object_row(row, f'data["{split}"][{n}]', "a dict (one row)")


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

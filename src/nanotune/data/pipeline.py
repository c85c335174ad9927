"""From a DataConfig and a tokenizer to the examples of each split, with counts of what was left
out."""

from __future__ import annotations

import itertools
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nanotune.data import cache as data_cache
from nanotune.data.config import DataConfig
from nanotune.data.example import BadRow, ClassExample, Example, PreferenceExample, Row, Task
from nanotune.data.formats import (
    FORMATS,
    TokenizerLike,
    TooLong,
    required_special_tokens,
    row_field,
    use_chat_template,
    use_markers_template,
)
from nanotune.data.mix import MixPart, describe, interleaved, with_counts
from nanotune.data.sources import balance_rows, iter_source, python_rows, split_rows
from nanotune.data.store import ExampleStore
from nanotune.data.stream import SourcedExample, Stream
from nanotune.errors import NanotuneError


@dataclass
class Datasets:
    """The examples of each split and an account of every row that did not become one.

    `stats[split]` counts rows read, examples made, `skipped_bad_row` (on_bad_row: skip) and
    `dropped_too_long` (truncation: drop); `problems` keeps the first messages for the report.
    """

    splits: dict[str, ExampleStore | list[ClassExample] | list[PreferenceExample]]
    """LM examples in an `ExampleStore` (a sequence of `Example`), the others as lists."""
    task: Task
    stats: dict[str, Counter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    label_names: list[str] | None = None
    """The class names in label order (classification only)."""
    added_tokens: list[str] = field(default_factory=list)
    cached: Path | None = None
    """The data cache entry these examples were read from, None when built now."""
    sources: list[MixPart] = field(default_factory=list)
    """data.sources: each source's counts; the train split holds their examples in turn."""

    @property
    def train(self) -> ExampleStore | list[ClassExample] | list[PreferenceExample]:
        return self.splits["train"]

    @property
    def val(self) -> ExampleStore | list[ClassExample] | list[PreferenceExample]:
        return self.splits.get("val", [])

    def summary(self) -> str:
        """One line per split: examples kept, rows skipped or dropped."""
        lines = []
        for name, c in self.stats.items():
            line = f"{name}: {c['examples']} examples from {c['rows']} rows"
            stream = self.splits.get(name)
            if getattr(stream, "streamed", False):
                line = (
                    f"{name}: streamed from {stream.source}, tokenized as it trains "
                    f"({c['examples']} examples from {c['rows']} rows read so far)"
                )
            left = [
                f"{c[k]} {k.replace('_', ' ')}"
                for k in ("skipped_bad_row", "dropped_too_long")
                if c[k]
            ]
            lines.append(line + (f" ({', '.join(left)})" if left else ""))
            if name == "train" and (self.sources or getattr(stream, "streamed", False)):
                lines += describe(self.sources or stream.parts())
        if self.cached is not None:
            lines.append(f"(tokenized examples read from the data cache: {self.cached})")
        return "\n".join(lines)


MAX_PROBLEMS = 20


def task_of(cfg: DataConfig) -> Task:
    """The task a data config calls for; every later part reads `Datasets.task` instead."""
    return FORMATS[cfg.format].task


Objects = Mapping[str, Any]
"""Rows given in Python by source name (`python:<split>`, see `sources.python_sources`)."""


def _rows(
    spec: str, cfg: DataConfig, objects: Objects, stats: Counter, problems: list[str]
) -> Iterator[Row]:
    """The rows of one source as they are read, columns mapped; an unreadable row is raised
    or counted in `stats` (on_bad_row) and left out."""
    if spec in objects:
        items = python_rows(spec, objects[spec])
    else:
        items = iter_source(
            spec,
            cfg.text_unit,
            cfg.hf_config,
            file_format=cfg.file_format,
            header=cfg.header,
            quoting=cfg.quoting,
            streaming=cfg.streaming,
        )
    for item in items:
        if isinstance(item, BadRow):
            _bad(item, cfg, stats, problems)
            continue
        try:
            yield _map_columns(item, cfg)
        except BadRow as e:
            _bad(e, cfg, stats, problems)


def _bad(e: BadRow, cfg: DataConfig, stats: Counter, problems: list[str]) -> None:
    if cfg.on_bad_row == "error":
        raise NanotuneError(f"{e} (or set data.on_bad_row: skip to skip such rows)") from e
    stats["skipped_bad_row"] += 1
    if len(problems) < MAX_PROBLEMS:
        problems.append(str(e))


def _map_columns(row: Row, cfg: DataConfig) -> Row:
    for canonical, column in cfg.columns.items():
        row[canonical] = _column(row, column, canonical)
    if task_of(cfg) == "classification":  # checked at read time so splitting can stratify by label
        row_field(row, "text")
        row_field(row, "label")
    return row


def _column(row: Row, column: str, canonical: str) -> Any:
    """`row[column]`; a dotted name reaches into nested records (`answers.text`, as in
    Hugging Face datasets' flattened column names)."""
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BadRow(
                f"{row.where}: missing column {column!r} (data.columns.{canonical}); "
                f"columns present: {', '.join(row)}"
            )
        value = value[part]
    return value


def _label_key(row: Row) -> str:
    return str(row_field(row, "label"))


def _label_names(cfg: DataConfig, rows: list[Row]) -> list[str]:
    if cfg.label_names is not None:
        return cfg.label_names
    names = sorted({_label_key(r) for r in rows})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    if len(names) < 2:
        raise NanotuneError(
            f"{cfg.source}: found {len(names)} distinct label(s) {names}; classification needs at "
            "least two (or set data.label_names)"
        )
    return names


def _held_out(cfg: DataConfig) -> dict[str, float]:
    """The splits cut from the training source, with their fractions."""
    return {
        name: frac
        for name, given, frac in (
            ("val", cfg.val_source, cfg.val_fraction),
            ("test", cfg.test_source, cfg.test_fraction),
        )
        if given is None and frac > 0
    }


def _given(cfg: DataConfig) -> dict[str, str]:
    """The splits read from sources of their own."""
    return {
        name: given
        for name, given in (("val", cfg.val_source), ("test", cfg.test_source))
        if given is not None
    }


def _check_not_empty(cfg: DataConfig, name: str, n: int) -> None:
    if not n:
        where = _given(cfg).get(name) or cfg.source
        raise NanotuneError(
            f"{where}: the {name} split is empty; check the file, the fractions or on_bad_row skips"
        )


def _split(
    cfg: DataConfig, objects: Objects, stats: dict[str, Counter], problems: list[str]
) -> dict[str, list[Row]]:
    stats["train"] = Counter()
    rows = list(_rows(cfg.source, cfg, objects, stats["train"], problems))
    stratify = task_of(cfg) == "classification" and cfg.stratify
    fractions = _held_out(cfg)
    if cfg.balance and rows:
        try:
            rows = balance_rows(rows, _label_key, cfg.seed)
        except BadRow as e:
            raise NanotuneError(f"{e} (balancing needs a label on every row)") from e
    out = split_rows(rows, fractions, cfg.seed, _label_key if stratify else None)
    for name in fractions:
        stats[name] = Counter()  # their bad rows were counted under train, where they were read
    for name, given in _given(cfg).items():
        stats[name] = Counter()
        out[name] = list(_rows(given, cfg, objects, stats[name], problems))
    for name, split_rows_ in out.items():
        if cfg.limit is not None:
            out[name] = split_rows_[: cfg.limit]
        stats[name]["rows"] = len(out[name])
        _check_not_empty(cfg, name, len(out[name]))
    return out


def _formatted(
    rows: list[Row],
    cfg: DataConfig,
    tokenizer: TokenizerLike,
    label_names: list[str] | None,
    stats: Counter,
    problems: list[str],
) -> list[ClassExample] | list[PreferenceExample]:
    """The classification or preference example of each row, in order; each row is dropped
    from `rows` once formatted, so rows and examples are never all held at once."""
    make = FORMATS[cfg.format].make
    named = {} if label_names is None else {"label_names": label_names}
    made = []
    for i in range(len(rows)):
        row, rows[i] = rows[i], None
        try:
            made.append(make(row, tokenizer, cfg, **named))
        except (TooLong, BadRow) as e:
            _left_out(e, cfg, stats, problems)
    return made


def _left_out(e: TooLong | BadRow, cfg: DataConfig, stats: Counter, problems: list[str]) -> None:
    """Count a row that made no example (or stop, as truncation / on_bad_row say)."""
    if not isinstance(e, TooLong):
        _bad(e, cfg, stats, problems)
        return
    if cfg.truncation == "error":
        raise e
    stats["dropped_too_long"] += 1
    if len(problems) < MAX_PROBLEMS:
        problems.append(str(e))


def _stops(e: TooLong | BadRow, cfg: DataConfig) -> bool:
    return cfg.truncation == "error" if isinstance(e, TooLong) else cfg.on_bad_row == "error"


@dataclass
class _Formatted:
    """One LM source's rows formatted in file order: the examples they made in a store
    (documents, for the text format), and for each row its example's index (-1 for none)."""

    store: ExampleStore
    example_of: np.ndarray
    failures: dict[int, tuple[bool, str]]
    """Why a row made no example, by row index: (too long, the message), replayed in split
    order, where it is counted (only the message is kept: an exception's frames hold the row)."""


ENCODE_BLOCK = 256  # rows whose texts are encoded in one batch call (FormatSpec.encoded_ahead)


class _Recorder:
    """A tokenizer that notes the texts a format asks to encode and answers none of them."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer, self.asked = tokenizer, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        self.asked.append((text, allow_special))
        return []


class _Prefetched:
    """A tokenizer whose `encode` answers from texts batch-encoded ahead (each answer once;
    any other text is encoded as asked)."""

    def __init__(self, tokenizer: TokenizerLike, asked: list[tuple[str, bool]]) -> None:
        self._tokenizer = tokenizer
        self._ids: dict[tuple[str, bool], list[int]] = {}
        for special in (True, False):
            texts = list(dict.fromkeys(t for t, s in asked if s == special))
            if texts:
                ids = tokenizer.encode_batch(texts, allow_special=special)
                self._ids.update(((t, special), i) for t, i in zip(texts, ids, strict=True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        ids = self._ids.pop((text, allow_special), None)
        return ids if ids is not None else self._tokenizer.encode(text, allow_special)


def _encoding_ahead(rows: list[Row], cfg: DataConfig, tokenizer: TokenizerLike, fmt) -> Any:
    """`tokenizer`, or one answering from a batch encoding of the texts `rows` need: a dry
    pass of the format over them notes the texts (its own errors are the real pass's to raise)."""
    recorder = _Recorder(tokenizer)
    for row in rows:
        try:
            fmt(row, recorder, cfg)
        except Exception:  # noqa: BLE001 - a bad row fails in the real pass, where it is counted
            pass
    return _Prefetched(tokenizer, recorder.asked)


def _format_rows(
    rows: Iterator[Row], cfg: DataConfig, tokenizer: TokenizerLike, keep: set[int] | None
) -> _Formatted:
    """Format each row as it is read (only the rows in `keep`, when given) into a store; where
    the tokenizer encodes faster in batches, a block of rows at a time (`ENCODE_BLOCK`)."""
    spec = FORMATS[cfg.format]
    fmt = spec.make
    batched = spec.encoded_ahead and getattr(tokenizer, "batch_is_faster", False)
    example_of = array("q")
    failures: dict[int, tuple[bool, str]] = {}
    made = 0

    def blocks() -> Iterator[tuple[list[tuple[int, Row]], Any]]:
        numbered = enumerate(rows)
        while block := list(itertools.islice(numbered, ENCODE_BLOCK if batched else 1)):
            used = [row for j, row in block if keep is None or j in keep]
            yield block, _encoding_ahead(used, cfg, tokenizer, fmt) if batched else tokenizer

    def examples() -> Iterator[Example]:
        nonlocal made
        for block, encoder in blocks():
            for j, row in block:
                example_of.append(-1)
                if keep is not None and j not in keep:
                    continue
                try:
                    example = fmt(row, encoder, cfg)
                except (TooLong, BadRow) as e:
                    if keep is None and _stops(e, cfg):  # every row is used: stop at the first
                        _left_out(e, cfg, Counter(), [])  # raises, as truncation/on_bad_row say
                    failures[j] = (isinstance(e, TooLong), str(e))
                    continue
                example_of[j] = made
                made += 1
                yield example

    store = ExampleStore.build(examples())
    return _Formatted(store, np.frombuffer(example_of, dtype=np.int64), failures)


def _build_lm(cfg: DataConfig, tokenizer: TokenizerLike, objects: Objects) -> Datasets:
    """LM splits, each row formatted as it is read: a split is cut as row indices (the same
    cut `split_rows` makes of the rows), so the rows are never all held, only their tokens.
    With a `limit`, the rows are counted first and only the kept ones formatted."""
    fractions, given = _held_out(cfg), _given(cfg)
    stats = {name: Counter() for name in ["train", *fractions, *given]}
    problems: list[str] = []
    added = required_special_tokens(cfg, tokenizer)
    if added:
        tokenizer.add_special_tokens(added)
    use_markers_template(cfg, tokenizer)

    def cut(n: int) -> dict[str, list[int]]:
        out = split_rows(list(range(n)), fractions, cfg.seed)
        return {name: ix[: cfg.limit] for name, ix in out.items()}

    if cfg.limit is None:  # one pass: every row is used
        train = _format_rows(
            _rows(cfg.source, cfg, objects, stats["train"], problems), cfg, tokenizer, None
        )
        plan = cut(len(train.example_of))
    else:  # the source is read twice: counted (the cut needs n), then the kept rows formatted
        plan = cut(sum(1 for _ in _rows(cfg.source, cfg, objects, stats["train"], problems)))
        keep = {j for ix in plan.values() for j in ix}
        train = _format_rows(_rows(cfg.source, cfg, objects, Counter(), []), cfg, tokenizer, keep)
    parts = {name: (train, ix) for name, ix in plan.items()}
    for name, spec in given.items():
        keep = None if cfg.limit is None else set(range(cfg.limit))
        formatted = _format_rows(
            _rows(spec, cfg, objects, stats[name], problems), cfg, tokenizer, keep
        )
        parts[name] = (formatted, list(range(len(formatted.example_of)))[: cfg.limit])
    del train
    for name, (_, ix) in parts.items():
        stats[name]["rows"] = len(ix)
        _check_not_empty(cfg, name, len(ix))
    splits: dict[str, ExampleStore] = {}
    for name in list(parts):
        formatted, ix = parts.pop(name)
        for j in ix:
            if j in formatted.failures:
                too_long, message = formatted.failures[j]
                _left_out(
                    TooLong(message) if too_long else BadRow(message), cfg, stats[name], problems
                )
        made = formatted.example_of[ix]
        store = formatted.store.take(made[made >= 0])
        if FORMATS[cfg.format].documents:
            store = store.chunked(tokenizer.eos_id, cfg.chunk_tokens)
        del formatted
        splits[name] = store
        stats[name]["examples"] = len(store)
        _check_has_examples(cfg, name, len(store), problems)
    return Datasets(splits, "lm", stats, problems, None, added)


def _check_has_examples(cfg: DataConfig, name: str, n: int, problems: list[str]) -> None:
    if not n:
        raise NanotuneError(
            f"{cfg.source}: no {name} examples left after formatting "
            f"({problems[0] if problems else 'no rows'})"
        )


def build_datasets(
    cfg: DataConfig, tokenizer: TokenizerLike, objects: Objects | None = None
) -> Datasets:
    """Read, split and format every split. Adds any chat markers the format needs to `tokenizer`
    (listed in `added_tokens`: the caller must resize the model's embeddings to match).

    objects: rows given in Python, by the source names that stand for them (`python:train`).

    LM data from files and builtins is read back from the data cache (`data/cache.py`) when
    this data, these options and this tokenizer were built before; `Datasets.cached` says so.
    """
    objects = objects or {}
    use_chat_template(cfg, tokenizer)  # before the cache key: the tokenizer's digest holds it
    root, key = data_cache.cache_root(), data_cache.cache_key(cfg, tokenizer)
    if root is not None and key is not None:
        hit = data_cache.load(root, key)
        if hit is not None:
            if hit["added_tokens"]:
                tokenizer.add_special_tokens(hit["added_tokens"])
            if hit["chat_template"] is not None:
                tokenizer.chat_template = hit["chat_template"]
            return Datasets(
                hit["splits"],
                task_of(cfg),
                hit["stats"],
                hit["problems"],
                None,
                hit["added_tokens"],
                cached=hit["entry"],
                sources=[MixPart(**p) for p in hit.get("sources", [])],
            )
    if cfg.streaming:  # never cached: a stream is read as it trains
        return _build_stream(cfg, tokenizer, objects)
    build = _build_mix if cfg.sources else _build_lm if task_of(cfg) == "lm" else _build
    data = build(cfg, tokenizer, objects)
    if root is not None and key is not None:
        meta = {
            "stats": data.stats,
            "problems": data.problems,
            "added_tokens": data.added_tokens,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "sources": [p.to_dict() for p in data.sources],
        }
        try:
            data_cache.save(root, key, data.splits, meta)
        except (OSError, NanotuneError) as e:  # a full or read-only disk costs the next run time
            print(f"note: the data cache was not written ({e})")
        else:
            # Train from the written arrays, memory-mapped: the built copies are let go, so the
            # tokens live in the page cache (shared, evictable), not in this process's heap.
            written = data_cache.load(root, key, verify=False)  # just written, fsynced
            if written is not None:
                data.splits = written["splits"]
    return data


def _build_stream(cfg: DataConfig, tokenizer: TokenizerLike, objects: Objects) -> Datasets:
    """data.streaming: the train split a `Stream` (rows formatted as the trainer reads them);
    given val/test sources built as usual."""
    problems: list[str] = []
    added = required_special_tokens(cfg, tokenizer)
    if added:
        tokenizer.add_special_tokens(added)
    use_markers_template(cfg, tokenizer)
    stats = {"train": Counter()}

    def examples_of(sub: DataConfig, counts: Counter) -> Iterator[Example]:
        spec = FORMATS[sub.format]
        batched = spec.encoded_ahead and getattr(tokenizer, "batch_is_faster", False)
        rows = _rows(sub.source, sub, objects, counts, problems)
        rows = itertools.islice(rows, sub.limit) if sub.limit is not None else rows
        made = _stream_examples(rows, sub, tokenizer, counts, problems, batched)
        if spec.documents:
            made = _stream_chunks(made, tokenizer.eos_id, sub.chunk_tokens)
        for ex in made:
            counts["examples"] += 1
            yield ex

    if cfg.sources:
        stream = _mixed_stream(cfg, tokenizer, examples_of, stats["train"])
    else:
        stream = Stream(cfg.source, lambda: examples_of(cfg, stats["train"]), stats["train"])
    splits: dict[str, Any] = {"train": stream}
    alone = {"streaming": False, "sources": [], "val_source": None, "test_source": None}
    for name, given in _given(cfg).items():
        part = _build_lm(replace(cfg, source=given, **alone), tokenizer, objects)
        splits[name], stats[name] = part.train, part.stats["train"]
        added += [t for t in part.added_tokens if t not in added]
        problems += part.problems[: MAX_PROBLEMS - len(problems)]
    return Datasets(splits, "lm", stats, problems, None, added)


def _mixed_stream(cfg: DataConfig, tokenizer: TokenizerLike, examples_of, total: Counter) -> Stream:
    """data.sources streamed: each source read as one streamed source is, again when it ends,
    interleaved by weight (`mix.interleaved`); `total` sums the sources' counts as they read."""
    subs = [cfg.source_config(i) for i in range(len(cfg.sources))]
    for sub in subs:
        added = required_special_tokens(sub, tokenizer)
        if added:
            tokenizer.add_special_tokens(added)
        use_markers_template(sub, tokenizer)
    counts = [Counter() for _ in subs]
    drawn = [0] * len(subs)

    def endless(i: int) -> Iterator[Example]:
        while True:
            made = 0
            for ex in examples_of(subs[i], counts[i]):
                made += 1
                yield ex
            if not made:
                raise NanotuneError(
                    f"{subs[i].source}: the stream gave no training examples "
                    f"(data.sources[{i}]); check its source, columns and data.max_length"
                )

    def examples() -> Iterator[Example]:
        for c in counts:  # a new reading (a resumed run) counts from the start again
            c.clear()
        drawn[:] = [0] * len(subs)
        weights = [1.0 if e.weight is None else e.weight for e in cfg.sources]
        for i, ex in interleaved([endless(i) for i in range(len(subs))], weights, drawn):
            total.clear()
            for c in counts:
                total.update(c)
            yield SourcedExample(ex.ids, ex.labels, i)

    def parts() -> list[MixPart]:
        return [
            MixPart(e.source, c["rows"], c["examples"], e.weight or 1.0, None, trained[i], True)
            for i, (e, c) in enumerate(zip(cfg.sources, counts, strict=True))
        ]

    stream = Stream("data.sources", examples, total, parts)
    trained = stream.trained
    return stream


def _stream_examples(
    rows: Iterator[Row],
    cfg: DataConfig,
    tokenizer: TokenizerLike,
    counts: Counter,
    problems: list[str],
    batched: bool,
) -> Iterator[Example]:
    """Each row's example as the rows arrive (a block of ENCODE_BLOCK encoded at once where
    the tokenizer is faster in batches); a row that makes none is counted or stops the run."""
    fmt = FORMATS[cfg.format].make
    rows = iter(rows)
    while block := list(itertools.islice(rows, ENCODE_BLOCK if batched else 1)):
        encoder = _encoding_ahead(block, cfg, tokenizer, fmt) if batched else tokenizer
        for row in block:
            counts["rows"] += 1
            try:
                yield fmt(row, encoder, cfg)
            except (TooLong, BadRow) as e:
                _left_out(e, cfg, counts, problems)


def _stream_chunks(docs: Iterator[Example], eos_id: int, size: int) -> Iterator[Example]:
    """Documents each followed by `eos_id`, concatenated and cut into blocks of `size` tokens,
    as `ExampleStore.chunked` cuts them (a last block shorter than 2 is dropped)."""
    buf: list[int] = []
    for doc in docs:
        buf += [*doc.ids, eos_id]
        start = 0
        while len(buf) - start >= size:
            block = buf[start : start + size]
            start += size
            yield Example(block, list(block))
        del buf[:start]
    if len(buf) >= 2:
        yield Example(buf, list(buf))


def _mix_builds(cfg: DataConfig) -> list[tuple[str | None, DataConfig]]:
    """What a mix reads: each entry alone (None), then each given split's source (its name)."""
    alone = {"sources": [], "val_source": None, "test_source": None}
    builds: list[tuple[str | None, DataConfig]] = [
        (None, cfg.source_config(i)) for i in range(len(cfg.sources))
    ]
    builds += [
        (name, replace(cfg, source=spec, **alone, val_fraction=0.0, test_fraction=0.0))
        for name, spec in _given(cfg).items()
    ]
    return builds


def _build_mix(cfg: DataConfig, tokenizer: TokenizerLike, objects: Objects) -> Datasets:
    """data.sources: each source built as one source is (its held-out fractions cut from it),
    the splits joined source after source; given val/test sources read once."""
    if task_of(cfg) != "lm":
        return _build_mix_lists(cfg, tokenizer, objects)
    stats: dict[str, Counter] = {}
    problems: list[str] = []
    added: list[str] = []
    pieces: dict[str, list[ExampleStore]] = {}
    parts = []
    for given, sub in _mix_builds(cfg):
        part = _build_lm(sub, tokenizer, objects)
        added += [t for t in part.added_tokens if t not in added]
        problems += part.problems[: MAX_PROBLEMS - len(problems)]
        for name, store in part.splits.items():
            name = given or name  # a given split's rows are its source's "train"
            pieces.setdefault(name, []).append(store)
            stats.setdefault(name, Counter()).update(part.stats["train" if given else name])
        if given is None:
            entry = cfg.sources[len(parts)]
            parts.append(
                MixPart(
                    entry.source,
                    part.stats["train"]["rows"],
                    len(part.train),
                    entry.weight,
                    entry.fraction,
                )
            )
    splits = {name: ExampleStore.concat(stores) for name, stores in pieces.items()}
    return Datasets(splits, "lm", stats, problems, None, added, sources=with_counts(parts))


def _build_mix_lists(cfg: DataConfig, tokenizer: TokenizerLike, objects: Objects) -> Datasets:
    """A classification or preference mix: every source's rows read and split first (the class
    names are those of every source's training rows), then each formatted with its options."""
    stats: dict[str, Counter] = {}
    problems: list[str] = []
    read = []
    for given, sub in _mix_builds(cfg):
        counts: dict[str, Counter] = {}
        read.append((given, sub, _split(sub, objects, counts, problems), counts))
    label_names = None
    if task_of(cfg) == "classification":
        train_rows = [r for given, _, rows, _ in read if given is None for r in rows["train"]]
        try:
            label_names = _label_names(cfg, train_rows)
        except BadRow as e:
            raise NanotuneError(f"{e} (classification needs a label on every row)") from e
    added: list[str] = []
    for _, sub, rows, _ in read:
        every_row = [r for split_rows_ in rows.values() for r in split_rows_]
        more = required_special_tokens(sub, tokenizer, every_row)
        if more:
            tokenizer.add_special_tokens(more)
            added += more
        use_markers_template(sub, tokenizer, every_row)
    splits: dict[str, list[Any]] = {}
    parts = []
    for given, sub, rows, counts in read:
        for name in list(rows):
            made = _formatted(rows.pop(name), sub, tokenizer, label_names, counts[name], problems)
            counts[name]["examples"] = len(made)
            _check_has_examples(sub, name, len(made), problems)
            splits.setdefault(given or name, []).extend(made)
            stats.setdefault(given or name, Counter()).update(counts[name])
        if given is None:
            entry = cfg.sources[len(parts)]
            c = counts["train"]
            parts.append(
                MixPart(entry.source, c["rows"], c["examples"], entry.weight, entry.fraction)
            )
    task = task_of(cfg)
    return Datasets(splits, task, stats, problems, label_names, added, sources=with_counts(parts))


def _build(cfg: DataConfig, tokenizer: TokenizerLike, objects: Objects) -> Datasets:
    """Classification and preference splits, small enough to hold as rows and lists."""
    stats: dict[str, Counter] = {}
    problems: list[str] = []
    rows = _split(cfg, objects, stats, problems)
    task = task_of(cfg)
    label_names = None
    if task == "classification":
        try:
            label_names = _label_names(cfg, rows["train"])
        except BadRow as e:
            raise NanotuneError(f"{e} (classification needs a label on every row)") from e
    every_row = [r for split_rows_ in rows.values() for r in split_rows_]
    added = required_special_tokens(cfg, tokenizer, every_row)
    if added:
        tokenizer.add_special_tokens(added)
    use_markers_template(cfg, tokenizer, every_row)
    del every_row
    splits: dict[str, Any] = {}
    for name in list(rows):
        # Each split's rows are let go as its examples are made (`_formatted`).
        split_rows_ = rows.pop(name)
        splits[name] = _formatted(split_rows_, cfg, tokenizer, label_names, stats[name], problems)
        stats[name]["examples"] = len(splits[name])
        _check_has_examples(cfg, name, len(splits[name]), problems)
    return Datasets(splits, task, stats, problems, label_names, added)

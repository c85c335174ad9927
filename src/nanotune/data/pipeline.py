"""From a DataConfig and a tokenizer to the examples of each split, with counts of what was left out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanotune.data import cache as data_cache
from nanotune.data.config import DataConfig
from nanotune.data.example import BadRow, ClassExample, PreferenceExample, Row, Task
from nanotune.data.formats import (
    LM_FORMATS,
    TokenizerLike,
    TooLong,
    as_text,
    bos,
    chunk_text,
    format_classification,
    format_preference,
    required_special_tokens,
    row_field,
    use_markers_template,
)
from nanotune.data.sources import balance_rows, iter_source, split_rows
from nanotune.data.store import ExampleStore
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
            left = [
                f"{c[k]} {k.replace('_', ' ')}"
                for k in ("skipped_bad_row", "dropped_too_long")
                if c[k]
            ]
            lines.append(line + (f" ({', '.join(left)})" if left else ""))
        if self.cached is not None:
            lines.append(f"(tokenized examples read from the data cache: {self.cached})")
        return "\n".join(lines)


MAX_PROBLEMS = 20


def task_of(cfg: DataConfig) -> Task:
    """The task a data config calls for; every later part reads `Datasets.task` instead."""
    if cfg.format in ("classification", "preference"):
        return cfg.format
    return "lm"


def _read(spec: str, cfg: DataConfig, stats: Counter, problems: list[str]) -> list[Row]:
    rows = []
    items = iter_source(
        spec,
        cfg.text_unit,
        cfg.hf_config,
        file_format=cfg.file_format,
        header=cfg.header,
        quoting=cfg.quoting,
    )
    for item in items:
        if isinstance(item, BadRow):
            _bad(item, cfg, stats, problems)
            continue
        try:
            rows.append(_map_columns(item, cfg))
        except BadRow as e:
            _bad(e, cfg, stats, problems)
    return rows


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


def _split(cfg: DataConfig, stats: dict[str, Counter], problems: list[str]) -> dict[str, list[Row]]:
    stats["train"] = Counter()
    rows = _read(cfg.source, cfg, stats["train"], problems)
    stratify = task_of(cfg) == "classification" and cfg.stratify
    fractions = {}
    for name, given, frac in (
        ("val", cfg.val_source, cfg.val_fraction),
        ("test", cfg.test_source, cfg.test_fraction),
    ):
        if given is None and frac > 0:
            fractions[name] = frac
    if cfg.balance and rows:
        try:
            rows = balance_rows(rows, _label_key, cfg.seed)
        except BadRow as e:
            raise NanotuneError(f"{e} (balancing needs a label on every row)") from e
    out = split_rows(rows, fractions, cfg.seed, _label_key if stratify else None)
    for name in fractions:
        stats[name] = Counter()  # their bad rows were counted under train, where they were read
    for name, given in (("val", cfg.val_source), ("test", cfg.test_source)):
        if given is not None:
            stats[name] = Counter()
            out[name] = _read(given, cfg, stats[name], problems)
    for name, split_rows_ in out.items():
        if cfg.limit is not None:
            out[name] = split_rows_[: cfg.limit]
        stats[name]["rows"] = len(out[name])
        if not out[name]:
            where = {"val": cfg.val_source, "test": cfg.test_source}.get(name) or cfg.source
            raise NanotuneError(
                f"{where}: the {name} split is empty; check the file, the fractions or on_bad_row skips"
            )
    return out


def _examples(
    rows: list[Row],
    cfg: DataConfig,
    tokenizer: TokenizerLike,
    label_names: list[str] | None,
    stats: Counter,
    problems: list[str],
) -> list[Any]:
    if cfg.format == "text":
        docs = []
        for row in rows:
            try:
                text = row_field(row, "text")
                # Several texts in one row (e.g. all answers to a question) form one document.
                text = " ".join(map(str, text)) if isinstance(text, list) else as_text(text)
                docs.append(bos(tokenizer) + tokenizer.encode(text))
            except BadRow as e:
                _bad(e, cfg, stats, problems)
        return ExampleStore.build(chunk_text(docs, tokenizer.eos_id, cfg.chunk_tokens))
    made = _formatted(rows, cfg, tokenizer, label_names, stats, problems)
    # LM examples are packed into a store as they are made, never all held as lists.
    return ExampleStore.build(made) if task_of(cfg) == "lm" else list(made)


def _formatted(
    rows: list[Row],
    cfg: DataConfig,
    tokenizer: TokenizerLike,
    label_names: list[str] | None,
    stats: Counter,
    problems: list[str],
) -> Iterator[Any]:
    """The example of each row, in order; each row is dropped from `rows` once formatted, so
    rows and examples are never all held at once."""
    for i in range(len(rows)):
        row, rows[i] = rows[i], None
        try:
            if task_of(cfg) == "classification":
                yield format_classification(row, tokenizer, cfg, label_names or [])
            elif task_of(cfg) == "preference":
                yield format_preference(row, tokenizer, cfg)
            else:
                yield LM_FORMATS[cfg.format](row, tokenizer, cfg)
        except TooLong as e:
            if cfg.truncation == "error":
                raise
            stats["dropped_too_long"] += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(str(e))
        except BadRow as e:
            _bad(e, cfg, stats, problems)


def build_datasets(cfg: DataConfig, tokenizer: TokenizerLike) -> Datasets:
    """Read, split and format every split. Adds any chat markers the format needs to `tokenizer`
    (listed in `added_tokens`: the caller must resize the model's embeddings to match).

    LM data from files and builtins is read back from the data cache (`data/cache.py`) when
    this data, these options and this tokenizer were built before; `Datasets.cached` says so.
    """
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
                "lm",
                hit["stats"],
                hit["problems"],
                None,
                hit["added_tokens"],
                cached=hit["entry"],
            )
    data = _build(cfg, tokenizer)
    if root is not None and key is not None:
        meta = {
            "stats": data.stats,
            "problems": data.problems,
            "added_tokens": data.added_tokens,
            "chat_template": getattr(tokenizer, "chat_template", None),
        }
        try:
            data_cache.save(root, key, data.splits, meta)
        except (OSError, NanotuneError) as e:  # a full or read-only disk costs the next run time
            print(f"note: the data cache was not written ({e})")
    return data


def _build(cfg: DataConfig, tokenizer: TokenizerLike) -> Datasets:
    stats: dict[str, Counter] = {}
    problems: list[str] = []
    rows = _split(cfg, stats, problems)
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
    splits = {}
    for name in list(rows):
        # Each split's rows are let go as its examples are made (`_formatted`).
        split_rows_ = rows.pop(name)
        splits[name] = _examples(split_rows_, cfg, tokenizer, label_names, stats[name], problems)
        stats[name]["examples"] = len(splits[name])
        if not splits[name]:
            raise NanotuneError(
                f"{cfg.source}: no {name} examples left after formatting ({problems[0] if problems else 'no rows'})"
            )
    return Datasets(splits, task, stats, problems, label_names, added)

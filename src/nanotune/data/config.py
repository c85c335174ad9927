"""DataConfig: where the data comes from, how rows become examples, how examples are batched."""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from nanotune.data.example import BadRow
from nanotune.data.formats import CHAT_LAYOUTS, FORMATS, may_render_chat
from nanotune.data.templates import resolve_chat_template
from nanotune.data.tools import tool_schemas
from nanotune.errors import NanotuneError

Format = Literal[tuple(FORMATS)]  # the names of the table of formats (data/formats.py)
ChatStyle = Literal["auto", "model", "markers"]
TextUnit = Literal["file", "paragraph", "line"]
FileFormat = Literal["csv", "tsv", "jsonl", "json", "parquet", "text"]
Quoting = Literal["none", "csv", "multiline"]


@dataclass
class DataSource:
    """One entry of `data.sources`: a source mixed into the training set, with its share and any
    reading or formatting option that differs from the data section's (null = the section's)."""

    source: str
    """A file, folder, builtin:<name> or hf:<id>[:<split>], as data.source."""
    weight: float | None = None
    """Share of each epoch, relative to the other weighted entries: the weighted entries
    together give as many examples an epoch as they hold, split in proportion to their weights
    (a small source is repeated, a large one sampled, seeded per epoch)."""
    fraction: float | None = None
    """Examples an epoch as a multiple of this source's own: 0.5 = a seeded half, 2 = each twice.
    An entry with neither weight nor fraction is fraction 1 (each example once an epoch)."""
    format: Format | None = None
    columns: dict[str, str | int] | None = None
    file_format: FileFormat | None = None
    header: bool | None = None
    quoting: Quoting | None = None
    text_unit: TextUnit | None = None
    hf_config: str | None = None
    prompt_template: str | None = None
    completion_template: str | None = None
    system_prompt: str | None = None
    limit: int | None = None


# DataSource fields that stand for the DataConfig field of the same name.
SOURCE_OPTIONS = tuple(f.name for f in fields(DataSource) if f.name not in ("weight", "fraction"))


@dataclass
class DataConfig:
    """Every option of the data pipeline; validated on construction (NanotuneError names the field).

    Source strings (``source``, ``val_source``, ``test_source``):
      - a file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt``/``.md``, or any
        name with ``file_format`` set) or a folder of such files (hidden ones skipped; a
        ``datasets.save_to_disk`` folder is read with ``datasets``);
      - ``builtin:<name>`` for data generated or shipped with nanotune (see ``data/builtin.py``);
      - ``hf:<dataset id>[:<split>]`` (or a bare ``owner/name`` that is not a local path) for a
        Hugging Face dataset, which needs the ``datasets`` extra and the hub or its cache.
    """

    source: str = ""
    """Where the rows come from: the train split, or all rows when fractions split them."""
    format: Format = "completion"
    """How a row becomes an example (the table of formats: data/formats.py).

    chat: a conversation in any common layout, recognised from the row: OpenAI `messages`
    (content a string or text parts), ShareGPT `conversations` (from/value), an HH-RLHF
    `dialogue`, or user/assistant, question/answer, prompt/completion or Alpaca
    instruction/input/output columns; content that is not text is a bad row. Tool calling: a
    `tools` column (or data.tools), assistant `tool_calls` and `tool` results (ShareGPT:
    function_call/observation), rendered by the chat template with tools (data.chat_template).

    preference: a prompt and a chosen and a rejected response (`prompt`/`chosen`/`rejected`,
    text or chat messages), or two HH-RLHF transcripts (`chosen`/`rejected` whole dialogues
    whose last assistant turns differ); only the responses are supervised."""
    columns: dict[str, str | int] = field(default_factory=dict)
    """Canonical field -> column in the data, e.g. {text: sms, label: category}.

    The canonical names are the ones the format reads (prompt/completion, messages,
    conversations (ShareGPT), tools, dialogue (an HH-RLHF "\n\nHuman: …\n\nAssistant: …"
    transcript), system/user/assistant, context/question/answer, instruction/input/output, text,
    label, prompt/chosen/rejected). A
    dotted column name (answers.text) reads a field of a nested record. With header: false the
    columns of a csv/tsv file are named by position from 1: {label: 1, text: 2}."""
    file_format: FileFormat | None = None
    """How local files are read; null = by extension.

    Set it for a file with no or another extension (the SMS Spam Collection ships as a
    tab-separated `SMSSpamCollection`); a folder is then read whole, every file in this format."""
    header: bool = True
    """csv/tsv: the first line names the columns; false = columns named by position "1", "2", …"""
    quoting: Quoting | None = None
    """csv/tsv: how '"' is read; null = csv for csv files, none for tsv.

    none: plain text, one row per line; csv: a quoted field may hold the delimiter and "" for a
    quote; multiline: as csv, and a quoted field may also span lines (as pandas' to_csv writes
    text with line breaks). Unless multiline, a field that spans lines is an error: it is almost
    always an unclosed quote that swallowed the lines after it."""
    val_source: str | None = None
    """Explicit validation data; when unset, val_fraction of `source` is held out instead."""
    test_source: str | None = None
    """Explicit test data; when unset, test_fraction of `source` is held out instead."""
    val_fraction: float = 0.0
    """Fraction of `source` held out as validation when no val_source is given."""
    test_fraction: float = 0.0
    """Fraction of `source` held out as test when no test_source is given."""
    seed: int = 0
    """Seed of the split (and of class balancing); splits are a pure function of it."""
    stratify: bool = True
    """classification: keep each class's share equal across splits."""
    balance: bool = False
    """classification: down-sample every class to the size of the smallest before splitting."""
    max_length: int = 1024
    """Longest example in tokens (prompt + completion, or one text chunk)."""
    truncation: Literal["drop", "error"] = "drop"
    """An example longer than max_length: drop it (counted) or stop with an error."""
    truncate_prompt: bool = False
    """Left-truncate the prompt (never the supervised part) before applying `truncation`.

    For classification: keep the first max_length tokens of the text."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A row that cannot be read or formatted: stop naming file and line, or skip it (counted)."""
    pack: bool = False
    """Pack several examples per sequence of max_length (LM formats only)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); batch order still shuffled."""
    limit: int | None = None
    """Keep at most this many rows per split (after splitting, so splits do not move);
    null = all."""
    prompt_template: str = "{prompt}"
    """completion: the prompt text, a str.format template over the row's fields."""
    separator: str = ""
    """completion: text between prompt and completion (part of the prompt, never supervised)."""
    completion_template: str = "{completion}"
    """completion: the supervised text, a template over the row's fields; EOS is appended."""
    train_on_prompt: bool = False
    """completion / chat / alpaca: also supervise the prompt tokens."""
    system_prompt: str = ""
    """chat: system prompt used when a conversation has none ("" = none)."""
    chat_style: ChatStyle = "auto"
    """chat: the model's chat template, nanotune's <|user|>… markers, or auto (the model's when
    the tokenizer has one)."""
    chat_template: str = ""
    """chat: the chat template to train with instead of the model's ("" = the model's): a
    packaged one (chatml-tools: ChatML turns with Hermes-style <tool_call> JSON, for tool calling
    on models whose own template drops tools, such as SmolLM2) or a template file. The run saves
    it with its tokenizer, so generate, serve and the GGUF export render as it trained."""
    tools: list[dict[str, Any]] | str | None = None
    """chat: tool (function) schemas for every conversation without a `tools` column: a list of
    OpenAI {type: function, function: {name, description, parameters}} objects or a JSON file
    of one; rendered by the chat template as transformers' apply_chat_template(tools=...)."""
    label_names: list[str] | None = None
    """classification: class names in label order; null = the sorted distinct labels."""
    chunk_tokens: int = 128
    """text: tokens per chunk when concatenating and cutting documents (was `block_size`)."""
    text_unit: TextUnit = "file"
    """text: a plain-text file is one document (file), or one per blank-line paragraph or line."""
    hf_config: str | None = None
    """hf: dataset configuration name (the second argument of datasets.load_dataset)."""
    sources: list[DataSource] = field(default_factory=list)
    """Several training sources mixed into one set, instead of `source`: a list of
    {source, weight | fraction, and any of format, columns, file_format, header, quoting,
    text_unit, hf_config, prompt_template, completion_template, system_prompt, limit}.

    Each epoch takes a seeded, exact number of examples from each (see weight and fraction), so
    a resumed run sees the same order; held-out fractions are cut from each source. Every entry
    trains data.format's task (language modelling, classification or preference pairs).
    With streaming, the sources are interleaved by weight (every prefix of the stream within
    one example of the weights' shares), each starting again when it ends."""
    streaming: bool = False
    """Read the training source as a stream, tokenizing rows as they arrive (hf: sources load
    as a datasets IterableDataset): for sets that do not fit on disk. Needs train.max_steps (a
    stream has no known length; it starts again when it ends); never cached; LM formats."""
    shuffle_buffer: int = 1000
    """streaming: examples held and drawn from at random (seeded); 0 = the stream's order.
    The buffer is filled before the first step, so a larger one starts later."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> NanotuneError:
            return NanotuneError(f"data.{name}: {why}")

        self.sources = [_source_entry(i, s) for i, s in enumerate(self.sources)]
        if self.sources and self.source:
            raise bad(
                "sources",
                "give data.source or data.sources, not both (data.source= clears a recipe's)",
            )
        if not self.source and not self.sources:
            raise bad(
                "source",
                "no data source given; set it to a file, folder, builtin:<name> or hf:<id>",
            )
        if self.streaming:
            for i, entry in enumerate(self.sources):
                if entry.fraction is not None:
                    raise NanotuneError(
                        f"data.sources[{i}].fraction: a stream's size is unknown; give weights"
                    )
            for name in ("val_fraction", "test_fraction"):
                if getattr(self, name):
                    raise bad(name, "a stream cannot be split; give val_source / test_source")
            if self.balance:
                raise bad("balance", "class balancing needs every row; not with streaming")
        if (
            not isinstance(self.shuffle_buffer, int)
            or isinstance(self.shuffle_buffer, bool)
            or self.shuffle_buffer < 0
        ):
            raise bad("shuffle_buffer", f"{self.shuffle_buffer!r} must be an integer >= 0")
        # The config loader checks these Literal fields; a DataConfig built in code, here.
        hints = get_type_hints(DataConfig)
        for f in fields(self):
            allowed = _choices(hints[f.name])
            value = getattr(self, f.name)
            if allowed and value is not None and value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                if f.name == "format" and str(value).lower() in CHAT_LAYOUTS:
                    hint = (
                        " (format: chat reads ShareGPT conversations, OpenAI messages and "
                        "Alpaca rows as they are; map other column names with data.columns)"
                    )
                raise bad(f.name, f"{value!r} is not one of {', '.join(allowed)}{hint}")
        for name in ("header", "quoting"):
            if getattr(self, name) not in (True, None) and self.file_format not in (
                None,
                "csv",
                "tsv",
            ):
                raise bad(name, f"applies to csv/tsv files, not file_format: {self.file_format}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise bad(name, f"{v!r} must be a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise bad("val_fraction", "val_fraction + test_fraction must leave rows for training")
        for name in ("max_length", "chunk_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                raise bad(name, f"{v!r} must be an integer >= 2")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise bad("limit", f"{self.limit!r} must be a positive integer or null")
        if not isinstance(self.columns, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
            for k, v in self.columns.items()
        ):
            raise bad("columns", "must map field names to column names, e.g. {text: sms}")
        self.columns = {k: str(v) for k, v in self.columns.items()}  # positions are names "1", "2"
        if not self.header and "0" in self.columns.values():
            raise bad(
                "columns", "with header: false positions count from 1 (the first column is 1)"
            )
        if self.label_names is not None:
            names = [str(n) for n in self.label_names]
            if len(names) < 2 or len(set(names)) != len(names):
                raise bad(
                    "label_names", f"{self.label_names!r} must list at least two distinct names"
                )
            self.label_names = names
        for name in ("prompt_template", "completion_template"):
            why = _template_problem(getattr(self, name))
            if why:
                raise bad(name, f"{getattr(self, name)!r}: {why}")
        if self.chat_template:
            if not may_render_chat(self.format):
                raise bad("chat_template", f"applies to conversations, not format: {self.format}")
            if self.chat_style == "markers":
                raise bad("chat_template", "a template, or chat_style: markers; not both")
            resolve_chat_template(self.chat_template)  # a missing file is told before any load
        if self.tools is not None:
            self.tools = _tools(self.tools)
        spec = FORMATS[self.format]
        if spec.documents and self.chunk_tokens > self.max_length:
            raise bad("chunk_tokens", f"{self.chunk_tokens} exceeds max_length={self.max_length}")
        if self.pack and spec.task != "lm":
            raise bad("pack", f"packing applies to language-model formats, not {self.format}")
        if self.balance and spec.task != "classification":
            raise bad("balance", "class balancing applies to format: classification only")
        if self.streaming and spec.task != "lm":
            raise bad("streaming", f"streams language-model formats, not format: {self.format}")
        for i in range(len(self.sources)):
            self.source_config(i)  # each entry's own options checked, named by its index

    def source_config(self, i: int) -> DataConfig:
        """The options of `sources[i]` alone: the section's, with the entry's source and its
        own values; no mix, no given val/test sources (those are read once, for the mix)."""
        entry = self.sources[i]
        own = {k: getattr(entry, k) for k in SOURCE_OPTIONS if getattr(entry, k) is not None}
        try:
            sub = replace(
                self,
                sources=[],
                val_source=None,
                test_source=None,
                **own,
            )
        except NanotuneError as e:
            raise NanotuneError(
                str(e).replace("data.", f"data.sources[{i}].", 1)
                if str(e).startswith("data.")
                else f"data.sources[{i}]: {e}"
            ) from None
        task, shared = FORMATS[sub.format].task, FORMATS[self.format].task
        if task != shared:
            raise NanotuneError(
                f"data.sources[{i}].format: {sub.format} trains {task}, but data.format "
                f"{self.format} trains {shared}; mixed sources train one task (set data.format "
                "to one of the entries' formats)"
            )
        return sub


def _source_entry(i: int, value: Any) -> DataSource:
    """One `data.sources` entry checked: known keys, a source, one positive weight or fraction."""
    where = f"data.sources[{i}]"
    if isinstance(value, dict):
        names = [f.name for f in fields(DataSource)]
        for key in value:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(names)}"
                raise NanotuneError(f"{where}.{key}: unknown key; {hint}")
        if "source" not in value:
            raise NanotuneError(f"{where}.source: required; name a file, builtin:<name> or hf:<id>")
        value = DataSource(**value)
    if not isinstance(value, DataSource):
        raise NanotuneError(
            f"{where}: expected a mapping such as {{source: a.jsonl, weight: 3}}, got {value!r}"
        )
    if not isinstance(value.source, str) or not value.source:
        raise NanotuneError(f"{where}.source: name a file, folder, builtin:<name> or hf:<id>")
    if value.weight is not None and value.fraction is not None:
        raise NanotuneError(
            f"{where}.weight: give weight (a share of the mix) or fraction (of this source), "
            "not both"
        )
    for name in ("weight", "fraction"):
        v = getattr(value, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise NanotuneError(f"{where}.{name}: {v!r} must be a number > 0")
    if value.limit is not None and (
        isinstance(value.limit, bool) or not isinstance(value.limit, int) or value.limit < 1
    ):
        raise NanotuneError(f"{where}.limit: {value.limit!r} must be a positive integer or null")
    return value


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """data.tools read: inline schemas, or a JSON file of them."""
    where = "data.tools"
    if isinstance(value, str):
        path = Path(value).expanduser()
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NanotuneError(f"data.tools: cannot read {path} ({e})") from e
        where = f"data.tools ({path})"
    try:
        return tool_schemas(value, where, "the schemas")
    except BadRow as e:
        raise NanotuneError(str(e)) from None


def _choices(tp: object) -> list[str]:
    """The names a Literal field (optional or not) allows; [] for other fields."""
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    if get_origin(tp) in (Union, UnionType):
        return [c for arg in get_args(tp) for c in _choices(arg)]
    return []


def _template_problem(template: str) -> str | None:
    """Why a row template is refused, or None: fields must name whole columns, as they are.

    str.format would follow `{quote.__class__}` or `{quote[0]}` into the value's attributes and
    items; a template has no business there (nested records are reached with data.columns). A
    format spec pads (`{quote:>300000000}` makes a 300 MB prompt of every row) or cuts a text
    value, nothing a prompt needs, so none is taken; a conversion (`{quote!r}`) only quotes.
    """
    try:
        names = _field_names(template)
    except ValueError as e:
        return (
            f"not a valid template ({e}); write fields as {{column}} and literal braces as "
            "{{ }}"
        )
    for name in names:
        if not name or "." in name or "[" in name:
            return (
                f"field {{{name}}} does not name a column; use whole columns like {{quote}}, and "
                "map nested fields with data.columns (e.g. columns: {answer: answers.text})"
            )
    for _, name, spec, conversion in string.Formatter().parse(template):
        if spec:
            field = f"{{{name}{'!' + conversion if conversion else ''}:{spec}}}"
            return (
                f"field {field} has a format spec (:{spec}); a template inserts each column as "
                f"it is: write {{{name}}}"
            )
    return None


def _field_names(template: str) -> list[str]:
    """Every replacement field of a str.format template, those nested in format specs too."""
    names = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            names += [name, *_field_names(spec or "")]
    return names

"""Formats: one row -> `Example`, `ClassExample` or `PreferenceExample`.

An `Example` is token ids and unshifted labels. Labels come from token spans: each part of an
example (prompt, completion, chat turn) is tokenized on its own and the parts are concatenated, so
the supervised span is known exactly and never found by searching for a template string (which
breaks when a template tokenizes differently in context). A chat template that marks the
assistant's text with `{% generation %}` blocks says exactly what to supervise; its mask is used
as transformers' `return_assistant_tokens_mask` gives it.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nanotune.data.example import (
    IGNORE,
    BadRow,
    ClassExample,
    Example,
    PreferenceExample,
    Row,
    Task,
)
from nanotune.data.templates import resolve_chat_template, template_tokens
from nanotune.data.tools import (
    check_tool_turns,
    missing_tool_parts,
    tool_calls,
    tool_schemas,
    uses_tools,
)
from nanotune.errors import NanotuneError

Message = dict[str, Any]  # {role, content} and, where they apply, tool_calls, tool_call_id, name
# Turn markers for models without a chat template (GPT-2); added as special tokens.
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_MARKER = "<|end|>"
MARKER_TOKENS = [*ROLE_MARKERS.values(), END_MARKER]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{extra}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class TokenizerLike(Protocol):
    """The part of `nanotune.tokenizer.Tokenizer` the data pipeline uses."""

    eos_id: int
    special_tokens: dict[str, int]
    chat_template: str | None
    marks_generation: bool

    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = False, **extra: Any
    ) -> str: ...

    def encode_chat(
        self, messages: list[Message], add_generation_prompt: bool = False, **extra: Any
    ) -> tuple[list[int], list[bool]]: ...


class FormatOptions(Protocol):
    """The part of `nanotune.data.DataConfig` the formats read (that module reads the table of
    formats at the end of this one, so this one does not import it)."""

    format: str
    max_length: int
    truncate_prompt: bool
    train_on_prompt: bool
    prompt_template: str
    separator: str
    completion_template: str
    system_prompt: str
    chat_style: str
    chat_template: str
    tools: Any


class TooLong(NanotuneError):
    """An example longer than max_length that may not be cut (its supervised part would be)."""


Segment = tuple[list[int], bool]  # (token ids, is the supervised "answer" part)


# The first line of the chat template that renders the markers (markers_chat_template).
MARKERS_TEMPLATE_TAG = "{# nanotune chat markers (data.chat_style: markers) #}"


def uses_markers(cfg: FormatOptions, tokenizer: TokenizerLike) -> bool:
    """True when chat rows render with nanotune's <|user|>... markers, not the model's template."""
    if cfg.chat_style == "markers":
        return True
    if cfg.chat_style == "model" and not tokenizer.chat_template:
        raise NanotuneError(
            "data.chat_style: model, but the tokenizer has no chat template; use markers"
        )
    # A markers template (set by a markers run and saved with its tokenizer) renders the same
    # text; the markers path also keeps the token pieces exactly as they trained.
    template = tokenizer.chat_template
    return not template or template.startswith(MARKERS_TEMPLATE_TAG)


def markers_chat_template(cfg: FormatOptions, tokenizer: TokenizerLike) -> str:
    """A jinja chat template rendering exactly the text the markers format trains on: BOS when
    the model expects it, data.system_prompt when a conversation has no system turn, each turn
    as `<|role|>\\n` content `<|end|>\\n`, and `<|assistant|>\\n` as the generation prompt."""

    def literal(value) -> str:  # JSON literals read back the same as jinja literals
        return json.dumps(value, ensure_ascii=False)

    return "".join(
        [
            MARKERS_TEMPLATE_TAG,
            "{% set MARKERS = " + literal(ROLE_MARKERS) + " %}",
            "{% set END = " + literal(END_MARKER) + " %}",
            "{% set SYSTEM = " + literal(cfg.system_prompt) + " %}",
            "{{ bos_token }}" if bos(tokenizer) else "",
            "{% if SYSTEM and messages and messages[0]['role'] != 'system' %}",
            "{{ MARKERS['system'] + '\\n' + SYSTEM + END + '\\n' }}",
            "{% endif %}",
            "{% for message in messages %}",
            "{% if message['role'] not in MARKERS %}",
            (
                "{{ raise_exception('role ' + message['role'] + "
                "' is not system, user or assistant') }}"
            ),
            "{% endif %}",
            "{{ MARKERS[message['role']] + '\\n' + message['content'] + END + '\\n' }}",
            "{% endfor %}",
            "{% if add_generation_prompt %}{{ MARKERS['assistant'] + '\\n' }}{% endif %}",
        ]
    )


def use_markers_template(
    cfg: FormatOptions, tokenizer: TokenizerLike, rows: Sequence[Row] = ()
) -> None:
    """Give a markers chat format's tokenizer the template that renders it, so the tokenizer
    saved with the fine-tune chats (`nanotune chat`, `generate --chat`) as it trained."""
    if renders_chat(cfg, rows) and uses_markers(cfg, tokenizer):
        tokenizer.chat_template = markers_chat_template(cfg, tokenizer)


def renders_chat(cfg: FormatOptions, rows: Sequence[Row] = ()) -> bool:
    """True when the format renders conversations (`rows`: the rows to be formatted; a
    preference row is a conversation when it holds messages or transcripts)."""
    return FORMATS[cfg.format].renders_chat(rows)


def required_special_tokens(
    cfg: FormatOptions, tokenizer: TokenizerLike, rows: Sequence[Row] = ()
) -> list[str]:
    """Special tokens the format needs that the tokenizer lacks.

    The caller adds them and resizes the model. rows: the rows to be formatted (a preference
    format needs the markers only for conversations)."""
    if not renders_chat(cfg, rows):
        return []
    if cfg.chat_template:  # a packaged template's turn tokens (GPT-2 has no <|im_start|>)
        wanted = template_tokens(cfg.chat_template)
    elif uses_markers(cfg, tokenizer):
        wanted = tuple(MARKER_TOKENS)
    else:
        return []
    return [t for t in wanted if t not in tokenizer.special_tokens]


def bos(tokenizer: TokenizerLike) -> list[int]:
    """[bos_id] for models that expect BOS first (the tokenizer's `add_bos`), else []."""
    bos_id = getattr(tokenizer, "bos_id", None)
    return [bos_id] if getattr(tokenizer, "add_bos", False) and bos_id is not None else []


def row_field(row: Row, name: str) -> Any:
    value = row.get(name)
    if value is None:
        present = ", ".join(k for k in row if row[k] is not None) or "none"
        raise BadRow(
            f"{row.where}: missing column {name!r} (present: {present}); map it with data.columns"
        )
    return value


class _Fields(string.Formatter):
    # The whole `{...}` name is a column of the row (passed as kwargs): str.format's attribute
    # and index lookups (`{text.__class__}`, `{x[0]}`) never run, so a template reaches only
    # row values.
    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[str, str]:
        return as_text(row_field(kwargs, field_name)), field_name


_FIELDS = _Fields()


_ONE_FIELD = re.compile(r"\{([^{}:!\[\]]+)\}")


def _render(template: str, row: Row, what: str) -> str:
    whole = _ONE_FIELD.fullmatch(template)
    if whole is not None:  # the usual "{column}": what the formatter gives, a fifth of the time
        return as_text(row_field(row, whole[1]))
    try:
        return _FIELDS.vformat(template, (), row)
    except ValueError as e:
        raise NanotuneError(
            f"data.{what}: bad template {template!r} ({e}); use {{column}} fields"
        ) from e


def as_text(value: Any) -> str:
    if isinstance(value, list):  # e.g. a list of tags
        return ", ".join(str(v) for v in value)
    return str(value)


def _assemble(segments: Sequence[Segment], cfg: FormatOptions, row: Row) -> Example:
    """Concatenate segments into an Example, applying train_on_prompt and the truncation policy."""
    ids: list[int] = []
    labels: list[int] = []
    lead = None  # tokens before the first answer token
    for seg_ids, is_answer in segments:
        if is_answer and seg_ids and lead is None:
            lead = len(ids)
        ids.extend(seg_ids)
        labels.extend(seg_ids if is_answer or cfg.train_on_prompt else [IGNORE] * len(seg_ids))
    if lead is None:
        raise BadRow(f"{row.where}: nothing to train on (no completion/assistant tokens)")
    excess = len(ids) - cfg.max_length
    if excess > 0:
        # Only leading prompt tokens may be cut; the supervised part is never shortened.
        if cfg.truncate_prompt and excess <= lead:
            ids, labels = ids[excess:], labels[excess:]
        else:
            raise TooLong(
                f"{row.where}: example has {len(ids)} tokens, more than data.max_length="
                f"{cfg.max_length}; raise max_length, set truncation: drop"
                + ("" if cfg.truncate_prompt else " or truncate_prompt: true")
            )
    return Example(ids, labels)


def format_completion(row: Row, tokenizer: TokenizerLike, cfg: FormatOptions) -> Example:
    prompt = _render(cfg.prompt_template, row, "prompt_template") + cfg.separator
    completion = _render(cfg.completion_template, row, "completion_template")
    return _assemble(
        [
            (bos(tokenizer) + tokenizer.encode(prompt), False),
            (tokenizer.encode(completion) + [tokenizer.eos_id], True),
        ],
        cfg,
        row,
    )


def format_alpaca(row: Row, tokenizer: TokenizerLike, cfg: FormatOptions) -> Example:
    extra = str(row.get("input") or "")
    prompt = ALPACA_PROMPT.format(
        extra=", paired with an input that provides further context" if extra else "",
        instruction=as_text(row_field(row, "instruction")),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    output = as_text(row_field(row, "output"))
    return _assemble(
        [
            (bos(tokenizer) + tokenizer.encode(prompt), False),
            (tokenizer.encode(output) + [tokenizer.eos_id], True),
        ],
        cfg,
        row,
    )


def _answer_text(value: Any) -> str:
    # SQuAD stores answers as {"text": [...], "answer_start": [...]}: train on the first one.
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value)


TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def transcript_messages(text: str, where: str) -> list[dict[str, str]]:
    """Turns of an Anthropic HH-RLHF style transcript, "\n\nHuman: …\n\nAssistant: …"."""
    parts = _TRANSCRIPT_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(
            f"{where}: a dialogue must be turns starting with '\\n\\nHuman: ' or "
            "'\\n\\nAssistant: '"
        )
    return [
        {"role": TRANSCRIPT_ROLES[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


# ShareGPT speakers (`from`) -> roles. A call turn's value is the JSON of its call(s), as
# LLaMA-Factory's ShareGPT layout stores them; an observation is a tool's result.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "tool_calls": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
SHAREGPT_CALLS = ("function_call", "tool_calls")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Names people give the layouts `format: chat` reads (its refusal of them as formats says so).
CHAT_LAYOUTS = ("sharegpt", "openai", "messages", "conversations", "chatml", "vicuna")


def _content(value: Any, where: str, field: str) -> str:
    """A message's text: a string, or OpenAI content parts whose text parts are joined with
    newlines (as vLLM does for text-only models). Anything else is a bad row: str() of a parts
    list or of None would train on Python's repr of it."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a part of type {kind!r}" if kind else f"not a text part ({_kind(part)})"
                raise BadRow(
                    f"{where}: {field}[{i}] is {what}; only text parts "
                    '({"type": "text", "text": …}) are trained on'
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRow(
        f"{where}: {field} is {_kind(value)}; it must be text or a list of "
        '{"type": "text", "text": …} parts'
    )


def _kind(value: Any) -> str:
    """How a value is named in a message: null, a list, an int, …"""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _openai_message(m: dict, where: str, field: str) -> Message:
    """OpenAI's {role, content}, an assistant's `tool_calls` (or the older `function_call`) and
    `reasoning_content`, a tool result's `tool_call_id` and `name` (role `function`: the older
    name of a tool result)."""
    role = "tool" if m["role"] == "function" else m["role"]
    calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else None)
    if role == "assistant" and calls:
        where_calls = f"{field}.{'tool_calls' if m.get('tool_calls') else 'function_call'}"
        out: Message = {
            "role": role,
            "content": "",
            "tool_calls": tool_calls(calls, where, where_calls),
        }
        if m.get("content") is not None:  # a call's content may be null or absent (OpenAI's)
            out["content"] = _content(m["content"], where, f"{field}.content")
    elif "content" not in m:
        raise BadRow(f"{where}: {field} has no 'content'")
    else:
        out = {"role": str(role), "content": _content(m["content"], where, f"{field}.content")}
    if role == "assistant" and m.get("reasoning_content") is not None:
        out["reasoning_content"] = _content(
            m["reasoning_content"], where, f"{field}.reasoning_content"
        )
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise BadRow(f"{where}: {field}.{key} is {_kind(m[key])}; it must be text")
                out[key] = m[key]
    return out


def _message(m: Any, where: str, field: str) -> Message:
    """One message as {role, content, …}: OpenAI's {role, content} or ShareGPT's {from, value}."""
    if isinstance(m, dict) and "role" in m:
        return _openai_message(m, where, field)
    if isinstance(m, dict) and "from" in m:
        speaker = m["from"]
        if speaker not in SHAREGPT_ROLES:
            raise BadRow(
                f"{where}: {field}.from is {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}"
            )
        if "value" not in m:
            raise BadRow(f"{where}: {field} has no 'value'")
        value = m["value"]
        if speaker in SHAREGPT_CALLS:
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": tool_calls(value, where, f"{field}.value"),
            }
        if not isinstance(value, str):
            raise BadRow(f"{where}: {field}.value is {_kind(value)}; it must be text")
        return {"role": SHAREGPT_ROLES[speaker], "content": value}
    raise BadRow(
        f"{where}: {field} needs 'role' and 'content' (OpenAI) or 'from' and 'value' (ShareGPT)"
    )


def _messages(raw: Any, where: str, field: str) -> list[Message]:
    """A list of messages in either layout (OpenAI or ShareGPT), as {role, content, …} dicts."""
    if not isinstance(raw, list) or not raw:
        raise BadRow(
            f"{where}: {field!r} must be a non-empty list of {{role, content}} (OpenAI) or "
            "{from, value} (ShareGPT) objects"
        )
    messages = [_message(m, where, f"{field}[{i}]") for i, m in enumerate(raw)]
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise BadRow(
                f"{where}: {field}[{i}] has role {m['role']!r}; use system, user, assistant or tool"
            )
    check_tool_turns(messages, where, field)
    return messages


def row_messages(row: Row, system_prompt: str = "") -> list[Message]:
    """The conversation in a chat row, in whichever common layout it is stored:
    OpenAI `messages` ({role, content}, content a string or text parts), ShareGPT
    `conversations` ({from, value}; either list in either name), a `dialogue` transcript
    (HH-RLHF's "\n\nHuman: …\n\nAssistant: …"), or system/user/assistant,
    context/question/answer, prompt/completion or Alpaca instruction/input/output columns.
    A top-level `system` column is the system turn of a conversation that has none.
    Messages may carry tool calls and results (`tool_calls`, role `tool`): see `data/tools.py`."""
    if row.get("dialogue") is not None:
        messages = transcript_messages(str(row["dialogue"]), row.where)
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise BadRow(f"{row.where}: the dialogue does not end with an assistant reply")
    elif row.get("messages") is not None:
        messages = _messages(row["messages"], row.where, "messages")
    elif row.get("conversations") is not None:
        messages = _messages(row["conversations"], row.where, "conversations")
    elif row.get("user") is not None:
        messages = [
            {"role": "user", "content": str(row["user"])},
            {"role": "assistant", "content": _answer_text(row_field(row, "assistant"))},
        ]
    elif row.get("question") is not None:
        question = str(row["question"])
        if row.get("context"):
            question = f"Context: {row['context']}\n\nQuestion: {question}"
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": _answer_text(row_field(row, "answer"))},
        ]
    elif row.get("prompt") is not None:
        messages = [
            {"role": "user", "content": str(row["prompt"])},
            {"role": "assistant", "content": _answer_text(row_field(row, "completion"))},
        ]
    elif row.get("instruction") is not None:
        instruction = _content(row["instruction"], row.where, "instruction")
        extra = row.get("input")
        if extra:
            instruction += "\n\n" + _content(extra, row.where, "input")
        messages = [
            {"role": "user", "content": instruction},
            {
                "role": "assistant",
                "content": _content(row_field(row, "output"), row.where, "output"),
            },
        ]
    else:
        raise BadRow(
            f"{row.where}: no conversation found; a chat row needs 'messages' (OpenAI), "
            "'conversations' (ShareGPT), user/assistant, question/answer, prompt/completion or "
            "instruction/output columns (map yours with data.columns)"
        )
    if row.get("system") and messages[0]["role"] != "system":
        system = _content(row["system"], row.where, "system")
        messages.insert(0, {"role": "system", "content": system})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _marker_segments(messages: list[Message], tokenizer: TokenizerLike) -> list[Segment]:
    enc = tokenizer.encode
    segments: list[Segment] = [(bos(tokenizer), False)]
    for m in messages:
        head = enc(f"{ROLE_MARKERS[m['role']]}\n")
        if m["role"] == "assistant":
            segments += [(head, False), (enc(m["content"] + END_MARKER), True), (enc("\n"), False)]
        else:
            segments.append((head + enc(m["content"] + END_MARKER + "\n"), False))
    return segments


def _template_segments(
    messages: list[Message], tokenizer: TokenizerLike, where: str, extra: dict[str, Any]
) -> list[Segment]:
    """Render prefix by prefix at each assistant turn; each new piece of text is tokenized on
    its own. Only the assistant turns are boundaries: what lies between two replies (a user
    turn, a run of tool results a template groups into one turn) is one piece."""

    def render(msgs: list[Message], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, **extra)

    def piece(before: str, after: str) -> str:
        if not after.startswith(before):
            raise NanotuneError(
                f"{where}: the model's chat template does not render conversations prefix by "
                "prefix; set data.chat_style: markers"
            )
        return after[len(before) :]

    # A turn's supervised span ends at its first special token (the end-of-turn marker); what
    # follows it (e.g. a newline) belongs to the scaffolding of the next turn.
    special = set(tokenizer.special_tokens.values()) | {tokenizer.eos_id}
    segments: list[Segment] = []
    # From the start: what a template writes before any turn (BOS, a system turn listing the
    # tools) is part of the text, as transformers renders it.
    prev = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:k], gen=True)
        segments.append((tokenizer.encode(piece(prev, head)), False))
        full = render(messages[: k + 1])
        ids = tokenizer.encode(piece(head, full))
        end = next((i + 1 for i, t in enumerate(ids) if t in special), len(ids))
        segments += [(ids[:end], True), (ids[end:], False)]
        prev = full
    if messages[-1]["role"] != "assistant":
        segments.append((tokenizer.encode(piece(prev, render(messages))), False))
    return segments


def _generation_segments(
    messages: list[Message], tokenizer: TokenizerLike, extra: dict[str, Any]
) -> list[Segment]:
    """The whole conversation in one piece, supervised where the template's `{% generation %}`
    blocks are: the template's own answer, not the prefix-by-prefix guess."""
    ids, mask = tokenizer.encode_chat(messages, **extra)
    return [([t], m) for t, m in zip(ids, mask, strict=True)]


# Templates known to render tool calling (or not), by their text: one probe render each.
_RENDERS_TOOLS: dict[str, list[str]] = {}


def _check_renders_tools(tokenizer: TokenizerLike, cfg: FormatOptions) -> None:
    """Refuse, naming the fix, a template (or the markers) that would drop tools, calls or
    results from the text: the model would train on replies to requests it never saw."""
    fix = (
        "set data.chat_template: chatml-tools (a packaged ChatML template with Hermes-style "
        "<tool_call> JSON, for models with <|im_start|> turns such as SmolLM2) or a path to a "
        "template file that renders them"
    )
    if uses_markers(cfg, tokenizer):
        raise NanotuneError(
            f"the conversations have tools, tool calls or tool results, which nanotune's "
            f"<|user|> chat markers do not render; {fix}"
        )
    template = tokenizer.chat_template or ""
    if template not in _RENDERS_TOOLS:
        if len(_RENDERS_TOOLS) > 16:
            _RENDERS_TOOLS.clear()
        _RENDERS_TOOLS[template] = missing_tool_parts(tokenizer.apply_chat_template)
    missing = _RENDERS_TOOLS[template]
    if missing:
        name = getattr(tokenizer, "name", "the model")
        raise NanotuneError(
            f"the conversations have tools, tool calls or tool results, but the chat template of "
            f"{name} drops {', '.join(missing)}; {fix}"
        )


def _chat_segments(
    messages: list[Message],
    tokenizer: TokenizerLike,
    cfg: FormatOptions,
    where: str,
    tools: list[dict[str, Any]] | None = None,
) -> list[Segment]:
    extra: dict[str, Any] = {}
    if uses_tools(messages, tools):
        _check_renders_tools(tokenizer, cfg)
        extra = {"tools": tools} if tools else {}
    if uses_markers(cfg, tokenizer):
        missing = [t for t in MARKER_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise NanotuneError(
                f"tokenizer lacks chat markers {', '.join(missing)}; add "
                "required_special_tokens(cfg, tokenizer) with tokenizer.add_special_tokens and "
                "resize the model's embeddings"
            )
        return _marker_segments(messages, tokenizer)
    if tokenizer.marks_generation:
        return _generation_segments(messages, tokenizer, extra)
    return _template_segments(messages, tokenizer, where, extra)


def row_tools(row: Row, cfg: FormatOptions) -> list[dict[str, Any]] | None:
    """The tool schemas a conversation is rendered with: the row's `tools`, else data.tools."""
    if row.get("tools") is not None:
        return tool_schemas(row["tools"], row.where, "tools")
    return cfg.tools or None


def format_chat(row: Row, tokenizer: TokenizerLike, cfg: FormatOptions) -> Example:
    messages = row_messages(row, cfg.system_prompt)
    tools = row_tools(row, cfg)
    return _assemble(_chat_segments(messages, tokenizer, cfg, row.where, tools), cfg, row)


def chat_prompt_ids(
    messages: list[Message],
    tokenizer: TokenizerLike,
    cfg: FormatOptions,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a conversation ending where the assistant's reply starts (for generation),
    rendered exactly as training renders it (with `tools`, the schemas it may call)."""
    messages = row_messages(Row({"messages": messages}, "chat"), cfg.system_prompt)
    if uses_markers(cfg, tokenizer):
        if uses_tools(messages, tools):
            _check_renders_tools(tokenizer, cfg)
        segments = _marker_segments(messages, tokenizer) + [
            (tokenizer.encode(ROLE_MARKERS["assistant"] + "\n"), False)
        ]
    else:
        extra = {"tools": tools} if tools else {}
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
        return tokenizer.encode(rendered)
    return [t for ids, _ in segments for t in ids]


def use_chat_template(cfg: FormatOptions, tokenizer: TokenizerLike) -> None:
    """Give the tokenizer the template data.chat_template names (packaged or a file), so the
    run renders, trains and is saved with it (generate, serve and the GGUF export then use it)."""
    if cfg.chat_template:
        tokenizer.chat_template = resolve_chat_template(cfg.chat_template)


# ---- preference pairs ------------------------------------------------------------------------

PAIR = ("chosen", "rejected")


def preference_is_chat(row: Row) -> bool:
    """A preference row renders as a conversation when it holds messages or, with no prompt,
    two whole transcripts; else it is text like the completion format."""
    return row.get("prompt") is None or any(isinstance(row.get(k), list) for k in ("prompt", *PAIR))


def _conversation(row: Row, which: str) -> list[dict[str, str]]:
    """The whole conversation ending in the `which` response (chosen or rejected)."""
    value = row_field(row, which)
    prompt = row.get("prompt")
    if prompt is None:  # whole dialogues: HH-RLHF transcripts or message lists
        if isinstance(value, list):
            return _messages(value, row.where, which)
        try:
            return transcript_messages(_content(value, row.where, which), row.where)
        except BadRow as e:
            raise BadRow(
                f"{row.where}: no prompt, and {which} is not an HH-RLHF transcript "
                "('\\n\\nHuman: …\\n\\nAssistant: …'); give a prompt column (data.columns)"
            ) from e
    head = (
        _messages(prompt, row.where, "prompt")
        if isinstance(prompt, list)
        else [{"role": "user", "content": _content(prompt, row.where, "prompt")}]
    )
    if isinstance(value, list):
        return head + _messages(value, row.where, which)
    return head + [{"role": "assistant", "content": _content(value, row.where, which)}]


def _last_supervised(segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """(everything before the last supervised run, that run): a conversation's prompt and its
    final reply; any scaffolding after the reply (a newline) follows nothing and is dropped."""
    ids = [t for seg, _ in segments for t in seg]
    answer = [a for seg, a in segments for _ in seg]
    end = max(i for i, a in enumerate(answer) if a) + 1
    start = end
    while start > 0 and answer[start - 1]:
        start -= 1
    return ids[:start], ids[start:end]


def _chat_pair(
    row: Row, tokenizer: TokenizerLike, cfg: FormatOptions
) -> tuple[list[int], list[int], list[int]]:
    convs = {which: _conversation(row, which) for which in PAIR}
    for which, conv in convs.items():
        if conv[-1]["role"] != "assistant":
            raise BadRow(
                f"{row.where}: the {which} conversation does not end with an assistant reply"
            )
        if not conv[-1]["content"].strip() and not conv[-1].get("tool_calls"):
            raise BadRow(f"{row.where}: the {which} response is empty")
    if convs["chosen"][:-1] != convs["rejected"][:-1]:
        pairs = zip(convs["chosen"], convs["rejected"], strict=False)
        turn = next((i for i, (a, b) in enumerate(pairs) if a != b), len(convs["chosen"]) - 1)
        raise BadRow(
            f"{row.where}: chosen and rejected differ before their last reply (turn {turn + 1}); "
            "a pair must share its prompt"
        )
    if len(convs["chosen"]) < 2:
        raise BadRow(f"{row.where}: no prompt before the last reply")
    rendered = {}
    tools = row_tools(row, cfg)
    for which, conv in convs.items():
        messages = row_messages(Row({"messages": conv}, row.where), cfg.system_prompt)
        segments = _chat_segments(messages, tokenizer, cfg, row.where, tools)
        rendered[which] = _last_supervised(segments)
    prompt = rendered["chosen"][0]
    if rendered["rejected"][0] != prompt:  # a whole-conversation tokenization merged across
        raise BadRow(
            f"{row.where}: the prompt tokenizes differently before chosen and rejected; "
            "set data.chat_style: markers"
        )
    return prompt, rendered["chosen"][1], rendered["rejected"][1]


def _text_pair(
    row: Row, tokenizer: TokenizerLike, cfg: FormatOptions
) -> tuple[list[int], list[int], list[int]]:
    prompt_text = _render(cfg.prompt_template, row, "prompt_template") + cfg.separator
    responses = []
    for which in PAIR:
        text = _content(row_field(row, which), row.where, which)
        if not text.strip():
            raise BadRow(f"{row.where}: the {which} response is empty")
        responses.append(tokenizer.encode(text) + [tokenizer.eos_id])
    return bos(tokenizer) + tokenizer.encode(prompt_text), *responses


def format_preference(row: Row, tokenizer: TokenizerLike, cfg: FormatOptions) -> PreferenceExample:
    """A prompt (encoded once) and two responses, each ending in EOS (text) or the template's
    end of turn (conversations), all of whose tokens are supervised."""
    if preference_is_chat(row):
        prompt, chosen, rejected = _chat_pair(row, tokenizer, cfg)
    else:
        prompt, chosen, rejected = _text_pair(row, tokenizer, cfg)
    if chosen == rejected:
        raise BadRow(f"{row.where}: chosen and rejected are the same response")
    if not prompt:
        raise BadRow(f"{row.where}: empty prompt; a response's first token needs one before it")
    excess = len(prompt) + max(len(chosen), len(rejected)) - cfg.max_length
    if excess > 0:
        # Only leading prompt tokens may be cut (never all of them); responses never are.
        if cfg.truncate_prompt and excess < len(prompt):
            prompt = prompt[excess:]
        else:
            raise TooLong(
                f"{row.where}: pair has {len(prompt) + max(len(chosen), len(rejected))} tokens "
                f"(prompt and the longer response), more than data.max_length={cfg.max_length}; "
                "raise max_length, set truncation: drop"
                + ("" if cfg.truncate_prompt else " or truncate_prompt: true")
            )
    return PreferenceExample(prompt, chosen, rejected)


def class_index(value: Any, label_names: list[str], where: str) -> int:
    """Index of a label given by name or by integer index; anything else is a BadRow."""
    name = str(value)
    if name in label_names:
        return label_names.index(name)
    if isinstance(value, int) or name.isdigit():
        i = int(name)
        if 0 <= i < len(label_names):
            return i
    raise BadRow(
        f"{where}: label {value!r} is not one of {', '.join(label_names)}; "
        "fix the row or data.label_names"
    )


def format_classification(
    row: Row, tokenizer: TokenizerLike, cfg: FormatOptions, label_names: list[str]
) -> ClassExample:
    ids = bos(tokenizer) + tokenizer.encode(as_text(row_field(row, "text")))
    label = class_index(row_field(row, "label"), label_names, row.where)
    if not ids:
        raise BadRow(f"{row.where}: empty text")
    if len(ids) > cfg.max_length:
        if not cfg.truncate_prompt:
            raise TooLong(
                f"{row.where}: text has {len(ids)} tokens, more than "
                f"data.max_length={cfg.max_length}; "
                "raise max_length, set truncation: drop or truncate_prompt: true"
            )
        ids = ids[: cfg.max_length]
    return ClassExample(ids, label)


def format_text(row: Row, tokenizer: TokenizerLike, cfg: FormatOptions) -> Example:
    """A document, every token supervised; documents are later joined and cut into chunks."""
    text = row_field(row, "text")
    # Several texts in one row (e.g. all answers to a question) form one document.
    text = " ".join(map(str, text)) if isinstance(text, list) else as_text(text)
    doc = bos(tokenizer) + tokenizer.encode(text)
    return Example(doc, doc)


# ---- the table of formats --------------------------------------------------------------------


def _never(rows: Sequence[Row]) -> bool:
    return False


def _always(rows: Sequence[Row]) -> bool:
    return True


def _any_conversation(rows: Sequence[Row]) -> bool:
    return any(preference_is_chat(r) for r in rows)


def may_render_chat(format: str) -> bool:
    """Whether rows of `format` may render as conversations (some or all of them)."""
    return FORMATS[format].renders_chat is not _never


@dataclass(frozen=True)
class FormatSpec:
    """What one `data.format` is. The pipeline, the data cache, the config checks, the model card
    and the CLI read this table; none of them compares format names."""

    task: Task
    """What the examples train (`Datasets.task`): lm, classification or preference."""
    make: Callable[..., Example | ClassExample | PreferenceExample]
    """Row -> example: `make(row, tokenizer, cfg)`; classification also takes `label_names`."""
    cacheable: bool
    """Its tokenized examples are kept in the data cache (LM stores; the others are small)."""
    metrics: tuple[str, ...]
    """What `nanotune eval --data` measures when no metrics are given."""
    encoded_ahead: bool = False
    """Its only tokenizer call is `encode`, so a block of rows' texts can be batch-encoded
    ahead (not text: a row may be a whole file, and a block of them would be held at once)."""
    documents: bool = False
    """Rows are documents, joined and cut into `chunk_tokens` chunks (not one example each)."""
    renders_chat: Callable[[Sequence[Row]], bool] = _never
    """Whether rows render as conversations (chat markers, the chat template), given the rows."""


FORMATS: dict[str, FormatSpec] = {
    "completion": FormatSpec(
        "lm", format_completion, cacheable=True, metrics=("perplexity", "squad"), encoded_ahead=True
    ),
    "chat": FormatSpec(
        "lm", format_chat, cacheable=True, metrics=("perplexity", "squad"), renders_chat=_always
    ),
    "alpaca": FormatSpec(
        "lm", format_alpaca, cacheable=True, metrics=("perplexity", "squad"), encoded_ahead=True
    ),
    "text": FormatSpec("lm", format_text, cacheable=True, metrics=("perplexity",), documents=True),
    "classification": FormatSpec(
        "classification", format_classification, cacheable=False, metrics=("accuracy",)
    ),
    "preference": FormatSpec(
        "preference",
        format_preference,
        cacheable=False,
        metrics=("preference",),  # how often chosen ranks above rejected; policies and rewards
        renders_chat=_any_conversation,
    ),
}

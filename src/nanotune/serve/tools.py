"""Tool calling over the chat API: `tools` and `tool_choice` in, OpenAI `tool_calls` out.

The tools are rendered by the model's chat template (as `apply_chat_template(tools=...)`), and
the reply is read back in the one call format nanotune parses, the Hermes / Qwen2.5
`<tool_call>{"name": …, "arguments": {…}}</tool_call>` JSON (nanotune's chatml-tools template
writes it). A template that drops the tools, or writes calls some other way, is refused by name:
its calls would come back as text the client cannot act on.

`tool_choice`: "auto" (the default with tools) lets the model answer or call; "none" renders no
tools and parses nothing; "required" and a named function start the reply with the call's opening
(`<tool_call>\\n{"name": "`, and the name when given), so the model writes the rest: a forced
start, not constrained decoding, and the arguments are the model's.

Streaming holds back text from a `<tool_call>` to its `</tool_call>` and sends each call whole as
one `tool_calls` delta (index, id, name and the arguments' JSON), as OpenAI's clients accumulate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from nanotune.data.example import BadRow
from nanotune.data.tools import (
    missing_tool_parts,
    parse_tool_calls,
    read_call,
    tool_schemas,
    writes_hermes_calls,
)
from nanotune.serve.protocol import bad
from nanotune.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_START = OPEN + '\n{"name": "'

# Templates (by their text) whose tool calling this server can and cannot parse: one probe each.
_PARSEABLE: dict[str, str | None] = {}


@dataclass
class ToolRequest:
    """What a chat request's `tools` and `tool_choice` ask for."""

    tools: list[dict[str, Any]] | None
    """The schemas the template renders (None: tool_choice none)."""
    prefill_ids: list[int] = field(default_factory=list)
    """The start of the reply the server writes for the model (a forced call), as the tokens
    the reply's text begins with when it is tokenized as training tokenized it."""
    prefill: str = ""
    """Their text."""

    @property
    def parses(self) -> bool:
        return self.tools is not None


def _why_not(tokenizer: Tokenizer) -> str | None:
    """Why the template's tool calls cannot be served, or None when they can."""
    template = tokenizer.chat_template or ""
    if template not in _PARSEABLE:
        if len(_PARSEABLE) > 16:
            _PARSEABLE.clear()
        missing = missing_tool_parts(tokenizer.apply_chat_template) if template else ["tools"]
        if missing:
            why = f"its chat template drops {', '.join(missing)}"
        elif not writes_hermes_calls(tokenizer.apply_chat_template):
            why = (
                "its chat template writes tool calls in a format nanotune serve does not parse "
                '(it reads Hermes/Qwen <tool_call>{"name": …, "arguments": …}</tool_call> JSON)'
            )
        else:
            why = None
        _PARSEABLE[template] = why
    return _PARSEABLE[template]


def tool_request(body: dict, tokenizer: Tokenizer, model: str) -> ToolRequest | None:
    """The checked `tools`/`tool_choice` of a chat request; None when it has no tools."""
    if body.get("functions") not in (None, []):
        raise bad("functions", "is the deprecated form of tools; send tools instead")
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice", "needs tools")
        return None
    try:
        tools = tool_schemas(raw, "tools", "tools")
    except BadRow as e:
        raise bad("tools", str(e).removeprefix("tools: ")) from None
    names = [t["function"]["name"] for t in tools]
    if choice == "none":
        return ToolRequest(None)
    if choice in (None, "auto"):
        forced = []
    elif choice == "required":
        forced = [(name, CALL_START) for name in names]
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in names:
            raise bad("tool_choice", f"names {name!r}, which is not one of the tools")
        forced = [(name, CALL_START + name + '", "arguments": ')]
    else:
        raise bad(
            "tool_choice",
            'must be "none", "auto", "required" or {"type": "function", "function": {"name": …}}',
        )
    why = _why_not(tokenizer)
    if why is not None:
        raise bad(
            "tools",
            f"model {model!r} cannot call tools here: {why}; serve a fine-tune trained with "
            "data.chat_template: chatml-tools (or a template in that format)",
        )
    ids = _forced_start(tokenizer, forced)
    return ToolRequest(tools, ids, tokenizer.decode(ids))


def _forced_start(tokenizer: Tokenizer, forced: list[tuple[str, str]]) -> list[int]:
    """The leading tokens of a call that spell (a prefix of) the forced text, for each
    (name, text); the shortest. A reply is tokenized on its own in training, and a prompt cut
    inside a token (`"arguments": ` where ` {` is one token) would ask for a token the model
    never saw there: the model writes the rest of the cut token itself."""
    best: list[int] | None = None
    for name, text in forced:
        call = tokenizer.encode(CALL_START + name + '", "arguments": {}}\n' + CLOSE)
        n = 0
        while n < len(call) and text.startswith(tokenizer.decode(call[: n + 1])):
            n += 1
        if best is None or n < len(best):
            best = call[:n]
    return best or []


def _with_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in calls]


def answer(text: str, request: ToolRequest) -> tuple[dict[str, Any], bool]:
    """(the assistant message, whether it calls tools) for a whole reply."""
    content, calls = parse_tool_calls(request.prefill + text)
    if not calls:
        return {"role": "assistant", "content": text}, False
    message = {"role": "assistant", "content": content or None, "tool_calls": _with_ids(calls)}
    return message, True


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (a tag still arriving)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class CallStream:
    """One streamed choice's text, turned into content and tool_calls deltas as it arrives."""

    text: str = ""
    pos: int = 0  # how much of `text` has been sent (as content or a call)
    calls: int = 0
    held: str = ""  # whitespace after content, sent only if more content follows

    def _content(self, piece: str, out: dict[str, Any]) -> None:
        stripped = piece.rstrip()
        if stripped:
            out["content"] = out.get("content", "") + self.held + stripped
            self.held = ""
        self.held += piece[len(stripped) :]

    def _call(self, body: str, whole: str, out: dict[str, Any]) -> None:
        call = read_call(body.strip())
        if call is None:  # not a call after all: it is text
            self._content(whole, out)
            return
        self.held = ""
        (made,) = _with_ids([call])
        out.setdefault("tool_calls", []).append({"index": self.calls, **made})
        self.calls += 1

    def feed(self, piece: str) -> dict[str, Any]:
        """The delta for newly generated text (empty while a call is still arriving)."""
        self.text += piece
        out: dict[str, Any] = {}
        while True:
            start = self.text.find(OPEN, self.pos)
            if start < 0:
                safe = len(self.text) - _partial(self.text, OPEN)
                if safe > self.pos:
                    self._content(self.text[self.pos : safe], out)
                    self.pos = safe
                return out
            if start > self.pos:
                self._content(self.text[self.pos : start], out)
                self.pos = start
            end = self.text.find(CLOSE, start)
            if end < 0:
                return out
            end += len(CLOSE)
            self._call(self.text[start + len(OPEN) : end - len(CLOSE)], self.text[start:end], out)
            self.pos = end

    def finish(self) -> dict[str, Any]:
        """The delta for what is left when the reply ends (a call never closed, held text)."""
        out: dict[str, Any] = {}
        rest = self.text[self.pos :]
        if rest.startswith(OPEN):
            self._call(rest[len(OPEN) :], rest, out)
        elif rest:
            self._content(rest, out)
        if self.held and not self.calls:
            out["content"] = out.get("content", "") + self.held
        self.pos, self.held = len(self.text), ""
        return out

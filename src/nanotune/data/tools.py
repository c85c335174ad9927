"""Tool calling in conversations: tool schemas, assistant tool calls and tool results in the
shape chat templates take them (transformers' `apply_chat_template(messages, tools=...)`),
whether a template renders them, and the Hermes / Qwen `<tool_call>` JSON a model answers in.

A call is kept as OpenAI writes it, `{id?, type: "function", function: {name, arguments}}`, with
`arguments` an object: OpenAI sends them as a JSON string, and templates that write them with
`tojson` (Qwen2.5's, Llama 3's) would quote that string a second time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from nanotune.data.example import BadRow
from nanotune.errors import NanotuneError

Message = dict[str, Any]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _json(value: Any, where: str, field: str) -> Any:
    """A JSON text read, or the value itself when it is already a list or an object."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise BadRow(f"{where}: {field} is not valid JSON ({e.msg} at character {e.pos})") from e


def tool_schemas(value: Any, where: str, field: str) -> list[dict[str, Any]] | None:
    """`tools`: a list of function schemas (or a JSON text of one, as ShareGPT sets store it),
    each OpenAI's `{type: function, function: {name, description, parameters}}`; a bare
    `{name, parameters}` is wrapped so. None or an empty list: no tools."""
    tools = _json(value, where, field)
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRow(f"{where}: {field} is {_kind(tools)}; it must be a list of function schemas")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRow(
                f"{where}: {field}[{i}] has no function name; a tool is "
                '{"type": "function", "function": {"name": …, "parameters": {…}}}'
            )
        out.append(tool if "function" in tool else {"type": "function", "function": tool})
    return out


def tool_calls(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    """An assistant's calls, each `{id?, type: function, function: {name, arguments}}` with the
    arguments an object; a bare `{name, arguments}` (ShareGPT's function_call) is read too."""
    calls = _json(value, where, field)
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise BadRow(f"{where}: {field} is {_kind(calls)}; it must be a non-empty list of calls")
    out = []
    for i, call in enumerate(calls):
        at = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise BadRow(f"{where}: {at} is {_kind(call)}; a call is an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise BadRow(f"{where}: {at}.function is {_kind(fn)}; it must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise BadRow(f"{where}: {at} has no function name; a call needs function.name")
        args_at = f"{at}.function.arguments" if "function" in call else f"{at}.arguments"
        args = _json(fn.get("arguments", {}), where, args_at)
        if not isinstance(args, dict):
            raise BadRow(f"{where}: {args_at} is {_kind(args)}; arguments are a JSON object")
        made: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if call.get("id") is not None:
            made = {"id": str(call["id"]), **made}
        out.append(made)
    return out


def uses_tools(messages: list[Message], tools: Any) -> bool:
    """Whether a conversation has tools, tool calls or tool results to render."""
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def check_tool_turns(messages: list[Message], where: str, field: str) -> None:
    """Each tool result follows an assistant message that made calls (tool results in between),
    and a `tool_call_id` names one of those calls."""
    calls: list[dict[str, Any]] | None = None
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            calls = m.get("tool_calls") or None
        elif m["role"] == "tool":
            if calls is None:
                raise BadRow(
                    f"{where}: {field}[{i}] is a tool result with no tool call before it; a tool "
                    "message follows an assistant message with tool_calls"
                )
            ids = [c["id"] for c in calls if "id" in c]
            wanted = m.get("tool_call_id")
            if wanted is not None and ids and wanted not in ids:
                raise BadRow(
                    f"{where}: {field}[{i}].tool_call_id {wanted!r} names none of the calls "
                    f"before it ({', '.join(ids)})"
                )
        else:
            calls = None


# ---- what a template renders -----------------------------------------------------------------

_PROBE_TOOL = "nanotune_probe_tool"
_PROBE_CALL = "nanotune_probe_call"
_PROBE_ARG = "nanotune_probe_arg"
_PROBE_RESULT = "nanotune_probe_result"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_TOOL,
            "description": "",
            "parameters": {"type": "object", "properties": {_PROBE_ARG: {"type": "integer"}}},
        },
    }
]
PROBE = [
    {"role": "user", "content": "?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": _PROBE_CALL, "arguments": {_PROBE_ARG: 7}},
            }
        ],
    },
    {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "call_0", "name": _PROBE_CALL},
]

Render = Callable[..., str]  # tokenizer.apply_chat_template


def missing_tool_parts(render: Render) -> list[str]:
    """What of tool calling a template drops: [] when it renders the tool schemas, the calls
    (name and arguments) and the results."""
    try:
        text = render(PROBE, add_generation_prompt=False, tools=PROBE_TOOLS)
    except NanotuneError as e:
        return [f"a conversation with tools (it refused one: {e})"]
    wanted = {
        "the tools' schemas": _PROBE_TOOL,
        "the assistant's tool_calls": _PROBE_CALL,
        "the calls' arguments": _PROBE_ARG,
        "tool results": _PROBE_RESULT,
    }
    return [what for what, mark in wanted.items() if mark not in text]


_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# A call opened and never closed (the model stopped at max_tokens, or at its end of turn).
_OPEN_CALL = re.compile(r"<tool_call>\s*(.*)$", re.DOTALL)


def writes_hermes_calls(render: Render) -> bool:
    """Whether a template writes an assistant's calls as Hermes / Qwen `<tool_call>` JSON, the
    format `parse_tool_calls` reads back."""
    try:
        text = render(PROBE[:2], add_generation_prompt=False, tools=PROBE_TOOLS)
    except NanotuneError:
        return False
    _, calls = parse_tool_calls(text)
    return any(
        c["function"]["name"] == _PROBE_CALL
        and json.loads(c["function"]["arguments"]) == {_PROBE_ARG: 7}
        for c in calls
    )


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside the calls, the calls) of a reply in the Hermes / Qwen format: each
    `<tool_call>{"name": …, "arguments": {…}}</tool_call>` becomes an OpenAI call
    `{type: function, function: {name, arguments}}` with the arguments a JSON string, as the
    OpenAI API sends them. A block that is not such JSON stays in the text."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for match in [*_CALL.finditer(text)]:
        call = read_call(match[1])
        if call is None:
            continue
        kept.append(text[pos : match.start()])
        pos = match.end()
        calls.append(call)
    rest = text[pos:]
    tail = _OPEN_CALL.search(rest)
    if tail is not None and (call := read_call(tail[1])) is not None:
        calls.append(call)
        rest = rest[: tail.start()]
    kept.append(rest)
    return "".join(kept).strip() if calls else text, calls


def read_call(body: str) -> dict[str, Any] | None:
    """One call's JSON (`{"name": …, "arguments": {…}}`) as an OpenAI call, or None."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }

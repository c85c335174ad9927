"""Chat templates packaged with nanotune, and `data.chat_template`: which one a run trains with.

A template is a Python string here, not a file: the package ships its modules whole, while package
data ships only what pyproject's globs name (recipes/*.yaml), and a string constant is read
without a file system (zip imports, frozen apps). The data part owns them (not the tokenizer)
because `data.chat_template` is read by the data pipeline, which may not import the tokenizer.

`chatml-tools` renders ChatML turns (`<|im_start|>role\\n … <|im_end|>\\n`, SmolLM2's and Qwen's
tokens) with tool calling in the Hermes / Qwen2.5 style, the layout most open models and servers
(vLLM's `hermes` parser, llama.cpp, Ollama) read:
- the tool schemas, one JSON object a line, inside `<tools></tools>` in the system turn;
- each call the assistant makes as `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`
  (after its text, if any), which `nanotune serve` parses back into OpenAI `tool_calls`;
- each tool result as its own `tool` turn inside `<tool_response></tool_response>`;
- `reasoning_content`, when a reply has one, as `<think>\\n…\\n</think>\\n\\n` before its text.
It adds no default system prompt (`data.system_prompt` gives one) and every turn renders the same
whatever follows it, so a conversation renders prefix by prefix.
"""

from __future__ import annotations

from pathlib import Path

from nanotune.errors import NanotuneError

CHATML_TOOLS = "\n".join(
    [
        "{#- nanotune chatml-tools: ChatML turns, Hermes-style <tool_call> JSON -#}",
        "{%- set first = messages[0] if messages else none -%}",
        "{%- set has_system = first is not none and first.role == 'system' -%}",
        "{%- if tools -%}",
        "  {{- '<|im_start|>system\\n' -}}",
        "  {%- if has_system and first.content -%}{{- first.content + '\\n\\n' -}}{%- endif -%}",
        "  {{- '# Tools\\n\\nYou may call the functions whose signatures are listed as JSON inside"
        " <tools></tools> tags:\\n<tools>' -}}",
        "  {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}",
        "  {{- '\\n</tools>\\n\\nTo call one, answer with a JSON object holding its name and"
        " arguments inside <tool_call></tool_call> tags, one per call:\\n<tool_call>\\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\\n'
        "</tool_call><|im_end|>\\n' -}}",
        "{%- elif has_system -%}",
        "  {{- '<|im_start|>system\\n' + first.content + '<|im_end|>\\n' -}}",
        "{%- endif -%}",
        "{%- for message in messages -%}",
        "  {%- if message.role == 'system' -%}",
        "    {%- if not loop.first -%}",
        "      {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' -}}",
        "    {%- endif -%}",
        "  {%- elif message.role == 'user' -%}",
        "    {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' -}}",
        "  {%- elif message.role == 'assistant' -%}",
        "    {{- '<|im_start|>assistant\\n' -}}",
        "    {%- if message.reasoning_content -%}",
        "      {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' -}}",
        "    {%- endif -%}",
        "    {%- if message.content -%}{{- message.content -}}{%- endif -%}",
        "    {%- for call in message.tool_calls or [] -%}",
        "      {%- set fn = call.function if call.function is defined else call -%}",
        "      {%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}",
        "      {{- '<tool_call>\\n{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' -}}",
        "      {%- if fn.arguments is string -%}{{- fn.arguments -}}",
        "      {%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}",
        "      {{- '}\\n</tool_call>' -}}",
        "    {%- endfor -%}",
        "    {{- '<|im_end|>\\n' -}}",
        "  {%- elif message.role == 'tool' -%}",
        "    {{- '<|im_start|>tool\\n<tool_response>\\n' + message.content"
        " + '\\n</tool_response><|im_end|>\\n' -}}",
        "  {%- else -%}",
        "    {{- raise_exception('chatml-tools: role ' + message.role"
        " + ' is not system, user, assistant or tool') -}}",
        "  {%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    ]
)

# name -> (template, the special tokens it writes: a tokenizer lacking them gets them added)
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml-tools": (CHATML_TOOLS, ("<|im_start|>", "<|im_end|>")),
}


def resolve_chat_template(value: str) -> str:
    """The template text `data.chat_template` names: a packaged template or a template file."""
    if value in TEMPLATES:
        return TEMPLATES[value][0]
    path = Path(value).expanduser()
    if not path.is_file():
        raise NanotuneError(
            f"data.chat_template: {value!r} is neither a packaged template "
            f"({', '.join(TEMPLATES)}) nor a template file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NanotuneError(f"data.chat_template: cannot read {path} ({e})") from e
    if not text.strip():
        raise NanotuneError(f"data.chat_template: {path} is empty")
    return text


def template_tokens(value: str) -> tuple[str, ...]:
    """The special tokens the template `value` names writes (none known for a file)."""
    return TEMPLATES[value][1] if value in TEMPLATES else ()

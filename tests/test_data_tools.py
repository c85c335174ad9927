"""Tool calling in chat data: every layout (OpenAI string and parts, ShareGPT, Alpaca, tools with
calls and results, reasoning) renders as transformers' `apply_chat_template(..., tools=...)`
renders it under SmolLM2's template, Qwen2.5's and nanotune's chatml-tools, and the supervised
tokens are exactly the assistant turns (tool calls included; tool results and prompts never)."""

from __future__ import annotations

import json
import shutil

import pytest

from nanotune.data import IGNORE, DataConfig, build_datasets
from nanotune.data.example import Row
from nanotune.data.formats import format_chat
from nanotune.data.templates import CHATML_TOOLS
from nanotune.errors import NanotuneError
from nanotune.tokenizer import Tokenizer

# Qwen/Qwen2.5-0.5B-Instruct's chat template (tokenizer_config.json, Apache-2.0), as JSON text:
# the hub is out of reach offline.
QWEN25 = json.loads(
    r'''"{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"'''  # noqa: E501
)

SYSTEM = {"role": "system", "content": "You answer in one word."}
CHAT = [
    {"role": "user", "content": "Colour of the sky?\nAnswer briefly."},
    {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "a + b",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
    },
]
PARIS = {"city": "Paris", "unit": "celsius"}


def _call(name: str, args: dict, id: str | None = None, as_text: bool = False) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    if as_text:  # OpenAI sends the arguments as a JSON string
        call["function"]["arguments"] = json.dumps(args)
    return {"id": id, **call} if id else call


ASK = {"role": "user", "content": "Weather in Paris?"}
ANSWER = {"role": "assistant", "content": "It is 21 degrees and sunny in Paris."}
RESULT = "sunny, 21 C"
# The conversation every tool layout below stores, as transformers takes it (arguments objects).
TOOL_CHAT = [
    SYSTEM,
    ASK,
    {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", PARIS, "c1")]},
    {"role": "tool", "content": RESULT, "tool_call_id": "c1", "name": "get_weather"},
    ANSWER,
]
PARALLEL = [
    ASK | {"content": "Weather in Paris, and 2 + 3?"},
    {
        "role": "assistant",
        "content": "Both at once.",
        "tool_calls": [_call("get_weather", PARIS, "a"), _call("add", {"a": 2, "b": 3}, "b")],
    },
    {"role": "tool", "content": RESULT, "tool_call_id": "a"},
    {"role": "tool", "content": '{"sum": 5}', "tool_call_id": "b"},
    {"role": "assistant", "content": "Sunny and 21 C; 2 + 3 = 5."},
]


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def _sharegpt(messages: list[dict]) -> list[dict]:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": speaker[m["role"]], "value": m["content"]} for m in messages]


# layout -> (row, data.tools, the conversation as transformers takes it, the tools it renders)
LAYOUTS = {
    "openai string": ({"messages": [SYSTEM, *CHAT]}, None, [SYSTEM, *CHAT], None),
    "openai parts": (
        {
            "messages": [
                {"role": "system", "content": _parts(SYSTEM["content"])},
                {"role": "user", "content": _parts("Colour of the sky?", "Answer briefly.")},
                {"role": "assistant", "content": _parts("Blue")},
                {"role": "user", "content": "And grass?"},
                {"role": "assistant", "content": _parts("Green, mostly")},
            ]
        },
        None,
        [SYSTEM, *CHAT],
        None,
    ),
    "sharegpt": ({"conversations": _sharegpt([SYSTEM, *CHAT])}, None, [SYSTEM, *CHAT], None),
    "alpaca": (
        {"instruction": "Name the colour of the sky.", "input": "At noon.", "output": "Blue"},
        None,
        [
            {"role": "user", "content": "Name the colour of the sky.\n\nAt noon."},
            {"role": "assistant", "content": "Blue"},
        ],
        None,
    ),
    "reasoning": (
        {
            "messages": [
                CHAT[0],
                {"role": "assistant", "content": "Blue", "reasoning_content": "Rayleigh."},
            ]
        },
        None,
        [CHAT[0], {"role": "assistant", "content": "Blue", "reasoning_content": "Rayleigh."}],
        None,
    ),
    "openai tools, calls, results": (
        {
            "tools": TOOLS,
            "messages": [
                SYSTEM,
                ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [_call("get_weather", PARIS, "c1", as_text=True)],
                },
                {"role": "tool", "content": RESULT, "tool_call_id": "c1", "name": "get_weather"},
                ANSWER,
            ],
        },
        None,
        TOOL_CHAT,
        TOOLS,
    ),
    "openai parallel calls, tools from data.tools": (
        {"messages": PARALLEL},
        TOOLS,
        PARALLEL,
        TOOLS,
    ),
    "sharegpt function_call and observation": (
        {
            "tools": json.dumps(TOOLS),  # as LLaMA-Factory's ShareGPT sets store them
            "system": SYSTEM["content"],
            "conversations": [
                {"from": "human", "value": ASK["content"]},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "get_weather", "arguments": PARIS}),
                },
                {"from": "observation", "value": RESULT},
                {"from": "gpt", "value": ANSWER["content"]},
            ],
        },
        None,
        [
            SYSTEM,
            ASK,
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", PARIS)]},
            {"role": "tool", "content": RESULT},
            ANSWER,
        ],
        TOOLS,
    ),
}
# "bos + smollm2": SmolLM2's template after a `{{ bos_token }}`, as Llama 3's and Gemma's begin:
# what a template writes before the first turn is part of the text (transformers keeps it).
TEMPLATES = {
    "smollm2": None,
    "bos + smollm2": "{{ bos_token }}",
    "qwen2.5": QWEN25,
    "chatml-tools": CHATML_TOOLS,
}
DROPS_TOOLS = ("smollm2", "bos + smollm2")


@pytest.fixture(scope="module")
def pairs(smollm2_tokenizer_dir, tmp_path_factory):
    """template name -> (nanotune, transformers) tokenizers of SmolLM2's vocabulary with it."""
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        folder = smollm2_tokenizer_dir
        if template is not None:
            if template == "{{ bos_token }}":
                template += Tokenizer.from_dir(smollm2_tokenizer_dir).chat_template
            folder = tmp_path_factory.mktemp(name.replace(" ", "_").replace("+", ""))
            shutil.copytree(smollm2_tokenizer_dir, folder, dirs_exist_ok=True)
            (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        out[name] = (Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder))
    return out


def _assistant_spans(hf, messages: list[dict], tools) -> list[tuple[int, int]]:
    """Where each assistant turn lies in the rendered text, by transformers: what its render adds
    after the generation prompt, through its <|im_end|>."""
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = hf.apply_chat_template(
            messages[:k], tools=tools, add_generation_prompt=True, tokenize=False
        )
        full = hf.apply_chat_template(messages[: k + 1], tools=tools, tokenize=False)
        assert full.startswith(head)
        end = full.index("<|im_end|>", len(head)) + len("<|im_end|>")
        spans.append((len(head), end))
    return spans


@pytest.mark.slow
@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_renders_and_supervises_as_transformers(layout, template, pairs):
    row, data_tools, messages, tools = LAYOUTS[layout]
    tok, hf = pairs[template]
    cfg = DataConfig(source="x", format="chat", tools=data_tools)
    made = Row(json.loads(json.dumps(row)), "chat.jsonl:1")
    if tools and template in DROPS_TOOLS:  # its template drops them: refused, naming the fix
        with pytest.raises(NanotuneError, match="drops the tools' schemas, the assistant's"):
            format_chat(made, tok, cfg)
        return
    text = hf.apply_chat_template(messages, tools=tools, tokenize=False)
    ref = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = _assistant_spans(hf, messages, tools)
    mask = [any(s < b and a < e for a, b in spans) for s, e in ref["offset_mapping"]]
    ex = format_chat(made, tok, cfg)
    assert tok.decode(ex.ids) == text
    assert ex.ids == ref["input_ids"]
    assert [lab != IGNORE for lab in ex.labels] == mask
    assert [lab for lab in ex.labels if lab != IGNORE] == [
        i for i, m in zip(ex.ids, mask, strict=True) if m
    ]
    supervised = tok.decode([i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE])
    assert supervised == "".join(text[a:b] for a, b in spans)
    for m in messages:  # tool results and prompts are never supervised
        if m["role"] != "assistant":
            assert m["content"] not in supervised


def test_tool_calls_are_supervised_and_results_are_not(pairs):
    """The chatml-tools rendering of a call, spelled out: the call is what the model learns."""
    tok = pairs["chatml-tools"][0]
    row, _, _, _ = LAYOUTS["openai tools, calls, results"]
    ex = format_chat(Row(row, "x:1"), tok, DataConfig(source="x", format="chat"))
    supervised = tok.decode([i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE])
    assert supervised == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call><|im_end|>It is 21 degrees and sunny in Paris.<|im_end|>"
    )
    absent = json.loads(json.dumps(row))
    del absent["messages"][2]["content"]  # OpenAI lets a call's content be absent, not only null
    assert format_chat(Row(absent, "x:1"), tok, DataConfig(source="x", format="chat")) == ex
    text = tok.decode(ex.ids)
    assert "<|im_start|>tool\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    reasoning = format_chat(Row(LAYOUTS["reasoning"][0], "x:2"), tok, DataConfig(source="x"))
    kept = [i for i, lab in zip(reasoning.ids, reasoning.labels, strict=True) if lab != IGNORE]
    assert tok.decode(kept) == "<think>\nRayleigh.\n</think>\n\nBlue<|im_end|>"


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_a_template_that_drops_tools_is_refused_with_the_fix(smollm2_tokenizer_dir, tmp_path):
    tok = Tokenizer.from_dir(smollm2_tokenizer_dir)
    source = _write(tmp_path / "tools.jsonl", [LAYOUTS["openai tools, calls, results"][0]])
    with pytest.raises(NanotuneError) as e:
        build_datasets(DataConfig(source=source, format="chat"), tok)
    said = str(e.value)
    assert f"the chat template of {tok.name} drops" in said and "\n" not in said
    assert "set data.chat_template: chatml-tools" in said
    # the fix works: the packaged template is given to the tokenizer (and saved with the run)
    cfg = DataConfig(source=source, format="chat", chat_template="chatml-tools")
    data = build_datasets(cfg, tok)
    assert tok.chat_template == CHATML_TOOLS and data.stats["train"]["examples"] == 1
    assert "<tool_call>" in tok.decode(data.train[0].ids)


def test_gpt2_gets_chatml_turn_tokens_and_markers_refuse_tools(gpt2_tokenizer_dir, tmp_path):
    source = _write(tmp_path / "tools.jsonl", [LAYOUTS["openai tools, calls, results"][0]])
    tok = Tokenizer.from_dir(gpt2_tokenizer_dir)
    with pytest.raises(NanotuneError, match="<|user|> chat markers do not render; set data.chat"):
        build_datasets(DataConfig(source=source, format="chat"), tok)
    tok = Tokenizer.from_dir(gpt2_tokenizer_dir)
    data = build_datasets(
        DataConfig(source=source, format="chat", chat_template="chatml-tools"), tok
    )
    assert data.added_tokens == ["<|im_start|>", "<|im_end|>"]
    (ex,) = data.train
    end = tok.special_tokens["<|im_end|>"]
    supervised = [i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE]
    assert supervised.count(end) == 2 and tok.decode(supervised).startswith("<tool_call>")


@pytest.mark.parametrize(
    "options, says",
    [
        ({"chat_template": "no-such"}, "data.chat_template: 'no-such' is neither a packaged"),
        (
            {"chat_template": "chatml-tools", "chat_style": "markers"},
            "data.chat_template: a template, or chat_style: markers",
        ),
        ({"chat_template": "chatml-tools", "format": "completion"}, "applies to conversations"),
        ({"tools": [{"description": "no name"}]}, r"data.tools: the schemas\[0\] has no function"),
        ({"tools": "missing.json"}, "data.tools: cannot read missing.json"),
    ],
)
def test_template_and_tools_options_are_checked(options, says):
    with pytest.raises(NanotuneError, match=says):
        DataConfig(source="x", **{"format": "chat", **options})


def test_tools_and_template_from_files(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps([t["function"] for t in TOOLS]))
    (tmp_path / "t.jinja").write_text(CHATML_TOOLS)
    cfg = DataConfig(
        source="x",
        format="chat",
        tools=str(tmp_path / "tools.json"),
        chat_template=str(tmp_path / "t.jinja"),
    )
    assert cfg.tools == TOOLS  # bare function schemas wrapped as OpenAI tools


def test_a_fine_tune_saves_the_template_it_trained_with(tmp_path, tiny_llama_dir):
    import nanotune

    rows = [LAYOUTS["openai tools, calls, results"][0], {"messages": PARALLEL}] * 2
    recipe = {
        "model": str(tiny_llama_dir),
        "method": {"name": "lora", "r": 2},
        "data": {"format": "chat", "max_length": 512, "chat_template": "chatml-tools"},
        "train": {"max_steps": 1, "micro_batch_size": 2},
        "output_dir": str(tmp_path / "run"),
    }
    result = nanotune.train(recipe, data={"train": rows}, progress=False)
    saved = json.loads((result.run_dir / "final" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == CHATML_TOOLS
    # what generate and serve load from the run, and its GGUF export, render with it too
    from nanotune.jobs.artifacts import load
    from nanotune.methods.lora import merge
    from nanotune.weights import load_model
    from nanotune.weights.gguf_export import export_gguf

    model, tokenizer = load(str(result.run_dir / "final"))
    assert tokenizer.chat_template == CHATML_TOOLS
    merge(model)
    gguf = export_gguf(model, tokenizer, tmp_path / "tools.gguf", quant="f32")
    assert load_model(gguf)[1].chat_template == CHATML_TOOLS


def test_builtin_tool_calls_answers_are_one_call_scored_by_the_parsed_call(pairs):
    from nanotune.data.builtin import TOOLS as BUILTIN_TOOLS
    from nanotune.data.builtin import tool_calls
    from nanotune.eval.evaluate import split_prompt
    from nanotune.eval.metrics import tool_call_scores

    rows = list(tool_calls(40, seed=3))
    assert rows == list(tool_calls(40, seed=3)) != list(tool_calls(40, seed=4))  # seeded
    names = {r["messages"][1]["tool_calls"][0]["function"]["name"] for r in rows}
    assert names == {t["function"]["name"] for t in BUILTIN_TOOLS}
    tok = pairs["chatml-tools"][0]
    cfg = DataConfig(source="x", format="chat")
    refs = []
    for row in rows:
        ex = format_chat(row, tok, cfg)
        _, ref = split_prompt(ex.ids, ex.labels)
        refs.append(tok.decode(ref, skip_special=True).strip())
        call = row["messages"][1]["tool_calls"][0]["function"]
        assert refs[-1] == (
            f"<tool_call>\n{json.dumps({'name': call['name'], 'arguments': call['arguments']})}"
            "\n</tool_call>"
        )
    assert tool_call_scores(refs, refs) == {"tool_call": 1.0, "tool_call_name": 1.0}
    # other arguments, another name, other spacing, plain text, a call never closed
    first = json.loads(refs[0].split("\n")[1])
    wrong_args = refs[0].replace(str(first["arguments"][next(iter(first["arguments"]))]), "0", 1)
    answers = [
        wrong_args,
        refs[1].replace(rows[1]["messages"][1]["tool_calls"][0]["function"]["name"], "nope"),
        "<tool_call>" + json.dumps(json.loads(refs[2].split("\n")[1]), indent=2) + "</tool_call>",
        "I cannot call tools.",
        refs[4].removesuffix("</tool_call>"),
    ]
    scores = tool_call_scores(answers, refs[:5])
    assert scores == {"tool_call": 2 / 5, "tool_call_name": 3 / 5}


def test_preference_pairs_of_tool_calls_render_the_tools(pairs):
    from nanotune.data.formats import format_preference

    tok = pairs["chatml-tools"][0]
    wrong = _call("get_weather", {"city": "Lyon"})
    row = {
        "tools": TOOLS,
        "prompt": [ASK],
        "chosen": [
            {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", PARIS)]}
        ],
        "rejected": [{"role": "assistant", "content": None, "tool_calls": [wrong]}],
    }
    ex = format_preference(Row(row, "p:1"), tok, DataConfig(source="x", format="preference"))
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in tok.decode(
        ex.prompt
    )
    assert tok.decode(ex.chosen) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call><|im_end|>"
    )
    assert '"Lyon"' in tok.decode(ex.rejected)

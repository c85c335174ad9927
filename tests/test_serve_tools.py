"""Tool calling through `nanotune serve` and the official `openai` client's `tools=`: a tiny Llama
whose LoRA adapter was fine-tuned (data.chat_template: chatml-tools) to answer one question with
a call answers it with OpenAI `tool_calls`, plain and streamed; its base, whose SmolLM2 template
drops tools, is refused by name."""

from __future__ import annotations

import json

import pytest

from nanotune.serve.tools import CallStream, ToolRequest, answer

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_serve import KEY, start, stop  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
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
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HI = [{"role": "user", "content": "Hi"}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
ROWS = [
    {
        "tools": TOOLS,
        "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
    },
    {"tools": TOOLS, "messages": [*HI, {"role": "assistant", "content": "Hello!"}]},
]


@pytest.fixture(scope="module")
def tool_server(tiny_llama_factory, tmp_path_factory):
    """A tiny Llama as the base, with an adapter that learned ROWS by heart."""
    import nanotune

    tiny_llama_dir = tiny_llama_factory(seed=3, max_position_embeddings=512)

    recipe = {
        "model": str(tiny_llama_dir),
        "method": {"name": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
        "data": {"format": "chat", "max_length": 512, "chat_template": "chatml-tools"},
        "train": {"max_steps": 80, "micro_batch_size": 2, "lr": 2e-2, "warmup_steps": 0},
        "output_dir": str(tmp_path_factory.mktemp("tools_run") / "run"),
    }
    result = nanotune.train(recipe, data={"train": ROWS * 2}, progress=False)
    adapter = result.run_dir / "final"
    running = start(
        tiny_llama_dir,
        "--served-model-name",
        "base",
        "--adapter",
        f"tools={adapter}",
        "--api-key",
        KEY,
    )
    yield running
    stop(running)


@pytest.mark.slow
def test_a_tool_call_comes_back_as_openai_tool_calls(tool_server):
    client = tool_server.client()
    out = client.chat.completions.create(
        model="tools", messages=ASK, tools=TOOLS, temperature=0, max_tokens=48
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    hi = client.chat.completions.create(
        model="tools", messages=HI, tools=TOOLS, temperature=0, max_tokens=16
    )
    assert hi.choices[0].finish_reason == "stop" and not hi.choices[0].message.tool_calls
    assert hi.choices[0].message.content == "Hello!"


def test_streamed_tool_calls_arrive_as_deltas(tool_server):
    client = tool_server.client()
    calls: dict[int, dict] = {}
    content, reasons = "", []
    for chunk in client.chat.completions.create(
        model="tools", messages=ASK, tools=TOOLS, temperature=0, max_tokens=48, stream=True
    ):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                got["name"] += tc.function.name or ""
                got["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"] and content == ""
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_tool_choice_and_a_tool_result_turn(tool_server):
    client = tool_server.client()
    forced = client.chat.completions.create(
        model="tools",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=32,
    )
    (call,) = forced.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    none = client.chat.completions.create(
        model="tools", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"
    # the client sends the call back (arguments as a JSON string) with the tool's result
    said = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    after = client.chat.completions.create(
        model="tools", messages=[*ASK, said, result], tools=TOOLS, temperature=0, max_tokens=4
    )
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_on_a_template_that_drops_them_are_refused_by_name(tool_server):
    client = tool_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, max_tokens=4)
    said = e.value.body["message"]
    assert "model 'base' cannot call tools here: its chat template drops the tools' schemas" in said
    assert "data.chat_template: chatml-tools" in said and e.value.body["param"] == "tools"
    for bad, param in [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tools", messages=ASK, max_tokens=4, **{"tools": TOOLS, **bad}
            )
        assert e.value.body["param"] == param


@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_streamed_reply_parses_as_the_whole_one(step):
    text = (
        "Both at once.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    )
    message, called = answer(text, ToolRequest(TOOLS))
    assert called and message["content"] == "Both at once."
    stream, deltas = CallStream(), []
    for i in range(0, len(text), step):
        deltas.append(stream.feed(text[i : i + step]))
    deltas.append(stream.finish())
    assert "".join(d.get("content", "") for d in deltas) == "Both at once."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"] for c in calls] == [c["function"] for c in message["tool_calls"]]
    plain = CallStream()
    parts = [plain.feed("Use <tool"), plain.feed("s> here\n"), plain.finish()]
    assert "".join(p.get("content", "") for p in parts) == "Use <tools> here\n"

"""Chat rows as people store them: every layout renders as transformers renders the same
conversation, supervises exactly the assistant turns, and a row that cannot be read as text is
a one-line bad row (file, line, field), never trained on."""

from __future__ import annotations

import json
import shutil

import pytest

from nanotune.data import IGNORE, DataConfig, build_datasets
from nanotune.data.example import Row
from nanotune.data.formats import format_chat, format_preference
from nanotune.errors import NanotuneError
from nanotune.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You answer in one word."}
CHAT = [
    {"role": "user", "content": "Colour of the sky?\nAnswer briefly."},
    {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly"},
]


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def _sharegpt(messages: list[dict]) -> list[dict]:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": speaker[m["role"]], "value": m["content"]} for m in messages]


# layout -> (row, the same conversation as OpenAI messages with string content)
LAYOUTS = {
    "openai string": ({"messages": [SYSTEM, *CHAT]}, [SYSTEM, *CHAT]),
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
        [SYSTEM, *CHAT],
    ),
    "sharegpt": ({"conversations": _sharegpt([SYSTEM, *CHAT])}, [SYSTEM, *CHAT]),
    "sharegpt, system column": (
        {"system": SYSTEM["content"], "conversations": _sharegpt(CHAT)},
        [SYSTEM, *CHAT],
    ),
    "sharegpt user/assistant/model speakers": (
        {
            "conversations": [
                {"from": "user", "value": CHAT[0]["content"]},
                {"from": "assistant", "value": "Blue"},
                {"from": "human", "value": "And grass?"},
                {"from": "model", "value": "Green, mostly"},
            ]
        },
        CHAT,
    ),
    "sharegpt turns under messages": ({"messages": _sharegpt(CHAT)}, CHAT),
    "alpaca": (
        {"instruction": "Name the colour of the sky.", "input": "At noon.", "output": "Blue"},
        [
            {"role": "user", "content": "Name the colour of the sky.\n\nAt noon."},
            {"role": "assistant", "content": "Blue"},
        ],
    ),
    "alpaca, no input": (
        {"instruction": "Name the colour of grass.", "input": "", "output": "Green"},
        [
            {"role": "user", "content": "Name the colour of grass."},
            {"role": "assistant", "content": "Green"},
        ],
    ),
}

# SmolLM2's template with its replies marked by {% generation %}: the same text, and transformers
# then gives the assistant mask (`return_assistant_tokens_mask`) to compare against.
MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
    "'<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol_pair(smollm2_tokenizer_dir, tmp_path_factory):
    """(nanotune, transformers) tokenizers of SmolLM2 with its own template, and with MARKED."""
    from transformers import AutoTokenizer

    marked = tmp_path_factory.mktemp("marked")
    shutil.copytree(smollm2_tokenizer_dir, marked, dirs_exist_ok=True)
    (marked / "chat_template.jinja").write_text(MARKED, encoding="utf-8")
    return {
        "plain": (
            Tokenizer.from_dir(smollm2_tokenizer_dir),
            AutoTokenizer.from_pretrained(smollm2_tokenizer_dir),
        ),
        "marked": (Tokenizer.from_dir(marked), AutoTokenizer.from_pretrained(marked)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_renders_and_supervises_as_transformers(layout, smol_pair):
    row, messages = LAYOUTS[layout]
    tok, hf = smol_pair["plain"]
    marked_tok, marked_hf = smol_pair["marked"]
    assert not tok.marks_generation and marked_tok.marks_generation
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == marked_hf.apply_chat_template(messages, tokenize=False)
    ref = marked_hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(ref["input_ids"]), [bool(m) for m in ref["assistant_masks"]]
    assert ids == list(
        hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    )
    for t in (tok, marked_tok):  # prefix by prefix, and by the template's generation blocks
        ex = format_chat(
            Row(json.loads(json.dumps(row)), "chat.jsonl:1"), t, DataConfig(source="x")
        )
        assert t.decode(ex.ids) == text
        assert ex.ids == ids
        assert [lab != IGNORE for lab in ex.labels] == mask
        supervised = t.decode(
            [i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE]
        )
        replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert supervised == "".join(replies)


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
# bad row -> what its one-line message says (after "file:line: ")
BAD_ROWS = {
    "image part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]},
                {"role": "assistant", "content": "A cat"},
            ]
        },
        "messages[0].content[1] is a part of type 'image_url'",
    ),
    "null content": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
        "messages[1].content is null",
    ),
    "number content": (
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]},
        "messages[1].content is an int",
    ),
    "unknown from": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
        "conversations[1].from is 'bot'",
    ),
    "sharegpt null value": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}]},
        "conversations[1].value is null",
    ),
    "tool result without a call": (
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me look."},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                {"role": "assistant", "content": "Sunny"},
            ]
        },
        "messages[2] is a tool result with no tool call before it",
    ),
    "sharegpt observation without a call": (
        {
            "conversations": [
                {"from": "human", "value": "Weather?"},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": "Sunny"},
            ]
        },
        "conversations[1] is a tool result with no tool call before it",
    ),
    "tool call without a name": (
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"arguments": "{}"}}
                    ],
                },
            ]
        },
        "messages[1].tool_calls[0] has no function name",
    ),
    "sharegpt call that is not JSON": (
        {
            "conversations": [
                {"from": "human", "value": "Weather?"},
                {"from": "function_call", "value": "weather(Paris)"},
            ]
        },
        "conversations[1].value is not valid JSON",
    ),
    "call arguments that are not an object": (
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "weather", "arguments": "[1, 2]"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.arguments is a list",
    ),
}
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", BAD_ROWS)
def test_a_bad_chat_row_is_one_line_naming_file_line_and_field(name, smol_pair, tmp_path):
    row, says = BAD_ROWS[name]
    source = _write(tmp_path / "chat.jsonl", [GOOD, row])
    tok = smol_pair["plain"][0]
    with pytest.raises(NanotuneError) as e:
        build_datasets(DataConfig(source=source, format="chat"), tok)
    message = str(e.value)
    assert message.startswith(f"{source}:2: {says}") and "\n" not in message


def test_bad_chat_rows_are_never_trained_on(smol_pair, tmp_path):
    tok = smol_pair["plain"][0]
    bad = [row for row, _ in BAD_ROWS.values()]
    source = _write(tmp_path / "chat.jsonl", [GOOD, *bad, GOOD])
    data = build_datasets(DataConfig(source=source, format="chat", on_bad_row="skip"), tok)
    assert data.stats["train"]["skipped_bad_row"] == len(bad)
    assert data.stats["train"]["examples"] == 2
    trained = [tok.decode(ex.ids) for ex in data.train]
    assert all(t == trained[0] and t.endswith("<|im_end|>\n") for t in trained)
    assert "Hello<|im_end|>" in trained[0] and "None" not in trained[0]
    assert len(data.problems) == len(bad)


def test_columns_name_a_layout(smol_pair, tmp_path):
    """`columns` maps a layout's field to the data's name for it: ShareGPT turns under `dialog`."""
    tok = smol_pair["plain"][0]
    rows = [{"dialog": _sharegpt(CHAT)}]
    source = _write(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(source=source, format="chat", columns={"conversations": "dialog"})
    (ex,) = build_datasets(cfg, tok).train
    direct = format_chat(Row({"messages": CHAT}, "x"), tok, DataConfig(source="x"))
    assert (list(ex.ids), list(ex.labels)) == (direct.ids, direct.labels)


def test_preference_conversations_refuse_what_is_not_text(smol_pair):
    tok = smol_pair["plain"][0]
    cfg = DataConfig(source="x", format="preference")
    prompt = [{"role": "user", "content": _parts("Colour of the sky?")}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": _parts("Blue")}],
        "rejected": [{"role": "assistant", "content": "Green"}],
    }
    ex = format_preference(Row(row, "p.jsonl:1"), tok, cfg)
    assert tok.decode(ex.chosen) == "Blue<|im_end|>"
    plain = {"prompt": [{"role": "user", "content": "Colour of the sky?"}], **row}
    plain["chosen"] = [{"role": "assistant", "content": "Blue"}]
    assert format_preference(Row(plain, "p.jsonl:1"), tok, cfg) == ex
    for which, value, says in [
        ("rejected", [{"role": "assistant", "content": None}], "rejected[0].content is null"),
        ("chosen", [{"from": "gpt", "value": ["Blue"]}], "chosen[0].value is a list"),
        ("rejected", {"text": "Green"}, "rejected is a dict"),
        ("prompt", [{"role": "user", "content": [IMAGE]}], "prompt[0].content[0] is a part"),
    ]:
        with pytest.raises(NanotuneError, match="^p.jsonl:2: " + says.replace("[", r"\[")):
            format_preference(Row({**row, which: value}, "p.jsonl:2"), tok, cfg)
    text_pair = {"prompt": "Sky?", "chosen": "Blue", "rejected": None}
    with pytest.raises(NanotuneError, match="missing column 'rejected'"):
        format_preference(Row(text_pair, "p.jsonl:3"), tok, cfg)
    text_pair["rejected"] = {"text": "Green"}
    with pytest.raises(NanotuneError, match="rejected is a dict"):
        format_preference(Row(text_pair, "p.jsonl:3"), tok, cfg)


def test_a_layout_named_as_format_points_to_chat():
    with pytest.raises(NanotuneError, match="format: chat reads ShareGPT conversations"):
        DataConfig(source="x", format="sharegpt")


# --- data from Python --------------------------------------------------------------------------

PY_ROWS = [
    {"conversations": _sharegpt(CHAT)},
    {"messages": [SYSTEM, *CHAT]},
    {"instruction": "Name the colour of grass.", "input": None, "output": "Green"},
] * 3


def _recipe(tmp_path, model) -> dict:
    return {
        "model": str(model),
        "method": {"name": "lora", "r": 2},
        "data": {"format": "chat", "max_length": 96},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3},
        "eval": {"metrics": ["perplexity"], "max_examples": 2},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["list", "dataframe"])
def test_train_from_python_rows(kind, tmp_path, tiny_llama_dir, monkeypatch):
    import nanotune

    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOTUNE_DATA_CACHE", str(cache))
    rows, held_out = PY_ROWS, PY_ROWS[:2]
    if kind == "dataframe":
        pd = pytest.importorskip("pandas")
        rows, held_out = pd.DataFrame(rows), pd.DataFrame(held_out)
        assert rows["input"].isna().all()  # read as None (no input), never the text "nan"
    result = nanotune.train(
        _recipe(tmp_path, tiny_llama_dir), data={"train": rows, "eval": held_out}, progress=False
    )
    assert result.step == 2 and result.train_loss is not None
    assert result.after["perplexity"] > 0
    saved = (result.run_dir / "config.yaml").read_text()
    assert "source: python:train" in saved and "val_source: python:eval" in saved
    assert not cache.exists()  # rows from Python are not cached (data/cache.py says why)


def test_python_rows_are_read_as_file_rows(smol_pair, tmp_path):
    """The same rows from a list, a datasets.Dataset and a file make the same examples; a bad
    row names the split and its index."""
    datasets = pytest.importorskip("datasets")
    from nanotune.data.sources import python_sources

    tok = smol_pair["plain"][0]
    rows = [{"messages": [SYSTEM, *CHAT]}, GOOD]
    source = _write(tmp_path / "chat.jsonl", rows)
    from_file = build_datasets(DataConfig(source=source, format="chat"), tok).train
    cfg = DataConfig(source="python:train", format="chat")
    for given in (rows, datasets.Dataset.from_list(rows)):
        objects = python_sources({"train": given})
        made = build_datasets(cfg, tok, objects).train
        assert [list(e.ids) for e in made] == [list(e.ids) for e in from_file]
        assert [list(e.labels) for e in made] == [list(e.labels) for e in from_file]
    bad = python_sources({"train": [GOOD, BAD_ROWS["null content"][0]]})
    with pytest.raises(
        NanotuneError, match=r'^data\["train"\]\[1\]: messages\[1\]\.content is null'
    ):
        build_datasets(cfg, tok, bad)
    with pytest.raises(NanotuneError, match=r'^data\["train"\]\[0\]: expected a dict'):
        build_datasets(cfg, tok, python_sources({"train": ["Hi"]}))
    with pytest.raises(NanotuneError, match="python:train: names rows handed to nanotune.train"):
        build_datasets(cfg, tok)


@pytest.mark.parametrize(
    "data, says",
    [
        ([GOOD], "give a mapping of splits to rows"),
        ({"eval": [GOOD]}, "give a mapping of splits to rows"),
        ({"train": [GOOD], "dev": [GOOD]}, "data\\['dev'\\]: not a split"),
        ({"train": iter([GOOD])}, "data\\['train'\\]: a list_iterator is not rows"),
        ({"train": {"messages": []}}, "data\\['train'\\]: a dict is not rows"),
        ({"train": [GOOD], "eval": [GOOD], "val": [GOOD]}, "both the validation split"),
    ],
)
def test_python_data_that_is_not_rows_is_refused_before_loading(data, says, tmp_path):
    import nanotune

    with pytest.raises(NanotuneError, match=says):
        nanotune.train(_recipe(tmp_path, "no-such-model"), data=data, progress=False)
    assert not (tmp_path / "run").exists()

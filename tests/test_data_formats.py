"""Label masks of every format: supervised tokens decode to exactly the answer and its end token."""

from __future__ import annotations

import json
import shutil

import pytest

from nanotune.data import (
    IGNORE,
    DataConfig,
    build_datasets,
    chat_prompt_ids,
    required_special_tokens,
)
from nanotune.data.example import Row
from nanotune.data.formats import (
    END_MARKER,
    FORMATS,
    format_alpaca,
    format_chat,
    format_classification,
    format_completion,
)
from nanotune.errors import NanotuneError
from nanotune.tokenizer import Tokenizer, gpt2_tokenizer
from nanotune.weights.gguf import load_gguf_tokenizer


@pytest.fixture
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_gguf_tokenizer(smollm2_gguf)


def supervised(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE])


def prompt_part(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.ids, ex.labels, strict=True) if lab == IGNORE])


def spans(ex) -> int:
    """Number of separate supervised runs."""
    sup = [lab != IGNORE for lab in ex.labels]
    return sum(1 for i, s in enumerate(sup) if s and (i == 0 or not sup[i - 1]))


def test_completion_supervises_completion_and_eos_only(gpt2):
    cfg = DataConfig(
        source="x", prompt_template="{quote}", separator=" ->: ", completion_template="{tags}"
    )
    row = Row(
        {"quote": "Be yourself; everyone else is taken.", "tags": ["be-yourself", "honesty"]}, "q:1"
    )
    ex = format_completion(row, gpt2, cfg)
    assert supervised(gpt2, ex) == "be-yourself, honesty<|endoftext|>"
    assert prompt_part(gpt2, ex) == "Be yourself; everyone else is taken. ->: "
    assert ex.ids[-1] == gpt2.eos_id and ex.labels[-1] == gpt2.eos_id
    on_prompt = format_completion(
        row, gpt2, DataConfig(**{**cfg.__dict__, "train_on_prompt": True})
    )
    assert on_prompt.labels == on_prompt.ids


def test_templates_reach_row_values_only(gpt2):
    row = Row({"quote": "hi", "2": "second column", "a.b": "dotted column"}, "q:7")

    def prompt(template: str) -> str:
        return prompt_part(gpt2, format_completion(row, gpt2, cfg(template)))

    def cfg(template: str) -> DataConfig:
        return DataConfig(source="x", prompt_template=template, completion_template="{quote}")

    # Fields are whole column names (positions with header: false too); a conversion quotes.
    assert prompt("{2} / {quote!r}") == "second column / 'hi'"
    # A format spec would pad (a 300 MB prompt from one field) or cut: refused, naming the field.
    for template in ("X{quote:>300000000}", "{quote!r:>6}", "{quote:.3}", "{quote:*^9}"):
        with pytest.raises(NanotuneError, match=r"data.prompt_template: .*has a format spec"):
            cfg(template)
    # No attribute or index lookups: refused when the config is built, before any row.
    for template in ("{quote.__class__}", "{quote.upper}", "{quote[0]}", "{a.b}", "{x:{y.z}}"):
        with pytest.raises(NanotuneError, match=r"data.prompt_template: .*does not name a column"):
            cfg(template)
    with pytest.raises(NanotuneError, match="data.prompt_template: '{quote': not a valid template"):
        cfg("{quote")
    with pytest.raises(NanotuneError, match=r"data.prompt_template: .*does not name a column"):
        cfg("{} {quote}")


def test_alpaca_supervises_output_only(gpt2):
    cfg = DataConfig(source="x", format="alpaca")
    row = Row({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, "a:1")
    ex = format_alpaca(row, gpt2, cfg)
    assert supervised(gpt2, ex) == "5<|endoftext|>"
    assert "### Input:\n2 and 3" in prompt_part(gpt2, ex)
    no_input = format_alpaca(Row({"instruction": "Say hi.", "output": "hi"}, "a:2"), gpt2, cfg)
    assert "### Input" not in prompt_part(gpt2, no_input)
    assert supervised(gpt2, no_input) == "hi<|endoftext|>"


@pytest.mark.slow
def test_gpt2_chat_markers_multi_turn(gpt2):
    cfg = DataConfig(source="x", format="chat", system_prompt="Be brief.")
    assert required_special_tokens(cfg, gpt2) == [
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    row = Row(
        {
            "messages": [
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        "c:1",
    )
    with pytest.raises(NanotuneError, match="lacks chat markers"):
        format_chat(row, gpt2, cfg)
    n_before = gpt2.vocab_size
    gpt2.add_special_tokens(required_special_tokens(cfg, gpt2))
    assert gpt2.vocab_size == n_before + 4 and required_special_tokens(cfg, gpt2) == []
    ex = format_chat(row, gpt2, cfg)
    assert supervised(gpt2, ex) == f"Hello!{END_MARKER}4{END_MARKER}"
    assert spans(ex) == 2
    assert prompt_part(gpt2, ex).startswith(
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>"
    )
    # Each marker is one token, and generation prompts are rendered exactly as in training.
    assert gpt2.encode("<|assistant|>") == [gpt2.special_tokens["<|assistant|>"]]
    prompt = chat_prompt_ids(row["messages"][:3], gpt2, cfg)
    assert ex.ids[: len(prompt)] == prompt
    assert ex.labels[len(prompt) - 1] == IGNORE and ex.labels[len(prompt)] != IGNORE


MARKER_CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Reply in French."},
        {"role": "user", "content": " two  spaces\nand a line"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "<|end|> inside"},
        {"role": "assistant", "content": "d'accord"},
    ],
]
# Quotes, jinja syntax, a backslash, non-ASCII and a newline survive the template's literal.
NASTY_SYSTEM = 'Say "hi" {{ x }} {% raw %} \\ é 😀\nthen stop.'


@pytest.mark.slow
@pytest.mark.parametrize("add_bos", [False, True])
def test_markers_chat_template_renders_the_training_text(add_bos, tmp_path):
    from transformers import AutoTokenizer

    tok = gpt2_tokenizer()
    tok.add_bos = add_bos
    rows = [{"messages": chat} for chat in MARKER_CHATS]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "chat.jsonl"), format="chat", system_prompt=NASTY_SYSTEM)
    data = build_datasets(cfg, tok)  # chat_style auto: GPT-2 has no template, so markers
    assert tok.chat_template and data.added_tokens
    tok.save(tmp_path / "saved")
    hf = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for chat, ex in zip(MARKER_CHATS, data.train, strict=True):
        text = tok.apply_chat_template(chat)
        assert text == tok.decode(ex.ids) and tok.encode(text) == ex.ids
        assert text.startswith("<|endoftext|>" if add_bos else "<|")
        assert hf.apply_chat_template(chat, tokenize=False) == text
        for k in range(1, len(chat), 2):  # each reply's prompt, as generation renders it
            prompt = tok.apply_chat_template(chat[:k], add_generation_prompt=True)
            assert prompt.endswith("<|assistant|>\n")
            assert tok.encode(prompt) == chat_prompt_ids(chat[:k], tok, cfg)
    with pytest.raises(NanotuneError, match="role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.slow
def test_smollm2_chat_template_multi_turn(smol):
    cfg = DataConfig(source="x", format="chat")
    assert required_special_tokens(cfg, smol) == []
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green."},
    ]
    ex = format_chat(Row({"messages": messages}, "c:1"), smol, cfg)
    assert supervised(smol, ex) == "Blue.<|im_end|>Green.<|im_end|>"
    assert spans(ex) == 2
    # The ids are the whole rendered conversation: nothing lost or added between pieces.
    assert smol.decode(ex.ids) == smol.apply_chat_template(messages)
    prompt = chat_prompt_ids(messages[:4], smol, cfg)
    assert ex.ids[: len(prompt)] == prompt and ex.labels[len(prompt)] != IGNORE


_SMOL_SYSTEM = (
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a "
    "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
)
# SmolLM2's template with its replies marked, as transformers' templates mark them; and one whose
# blocks open and close inside words and inside a special token (the overlap rule decides).
GENERATION_TEMPLATES = {
    "replies": "{% for message in messages %}" + _SMOL_SYSTEM + "{{ '<|im_start|>' + "
    "message['role'] + '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "cut mid-token": "{% for message in messages %}" + _SMOL_SYSTEM + "{{ '<|im_start|>' + "
    "message['role'] + '\nRe' }}{% if message['role'] == 'assistant' %}{%- generation -%}"
    "{{ 'ply: ' + message['content'] + 'ish<|im' }}{%- endgeneration -%}{% else %}"
    "{{ 'quest: ' + message['content'] + '<|im' }}{% endif %}{{ '_end|>\n' }}{% endfor %}",
}
GENERATION_CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Colour of the sky? 日本 🤗"},
    {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, 🤗 mostly"},
]


def _transformers_mask(hf, chat) -> tuple[list[int], list[bool]]:
    out = hf.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("name", GENERATION_TEMPLATES)
def test_generation_blocks_label_what_transformers_masks(name, smollm2_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(GENERATION_TEMPLATES[name], encoding="utf-8")
    tok, hf = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.marks_generation
    assert tok.apply_chat_template(GENERATION_CHAT) == hf.apply_chat_template(
        GENERATION_CHAT, tokenize=False
    )
    ex = format_chat(Row({"messages": GENERATION_CHAT}, "c:1"), tok, DataConfig(source="x"))
    ids, mask = _transformers_mask(hf, GENERATION_CHAT)
    assert ex.ids == ids and [lab != IGNORE for lab in ex.labels] == mask
    assert spans(ex) == 2
    if name == "replies":
        assert supervised(tok, ex) == "Blue<|im_end|>Green, 🤗 mostly<|im_end|>"
    else:  # the tokens the block boundaries cut count as the assistant's
        assert supervised(tok, ex).startswith("Reply: Blueish<|im_end|>")
    train_all = format_chat(
        Row({"messages": GENERATION_CHAT}, "c:1"), tok, DataConfig(source="x", train_on_prompt=True)
    )
    assert train_all.labels == train_all.ids == ids


@pytest.mark.slow
def test_generation_blocks_on_the_tiktoken_bpe(tmp_path):
    from transformers import AutoTokenizer

    tok = gpt2_tokenizer()
    # The reply's block opens after ': ', inside the token ' Blue'.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '\n' }}{% endfor %}"
    )
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ex = format_chat(Row({"messages": GENERATION_CHAT}, "c:1"), tok, DataConfig(source="x"))
    ids, mask = _transformers_mask(hf, GENERATION_CHAT)
    assert type(tok._backend).__name__ == "_TiktokenBackend"
    assert ex.ids == ids and [lab != IGNORE for lab in ex.labels] == mask
    assert supervised(tok, ex) == " Blue<|endoftext|> Green, 🤗 mostly<|endoftext|>"


def test_a_template_without_generation_blocks_keeps_the_span_labels(smol):
    assert not smol.marks_generation
    with pytest.raises(NanotuneError, match="no \\{% generation %\\} blocks"):
        smol.encode_chat(GENERATION_CHAT)


def test_squad_style_context_question_answer(smol):
    cfg = DataConfig(source="x", format="chat")
    row = Row(
        {
            "context": "Paris is the capital of France.",
            "question": "What is the capital of France?",
            "answers": {"text": ["Paris"], "answer_start": [0]},
        },
        "squad: row 0",
    )
    row["answer"] = row["answers"]  # what data.columns {answer: answers} does
    ex = format_chat(row, smol, cfg)
    assert supervised(smol, ex) == "Paris<|im_end|>"
    assert (
        "Context: Paris is the capital of France.\n\nQuestion: What is the capital"
        in prompt_part(smol, ex)
    )


def test_text_blocks_supervise_every_token_with_eos_between_docs(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text("The first document is here.")
    (tmp_path / "b.txt").write_text("A second one follows it, somewhat longer than the first.")
    data = build_datasets(
        DataConfig(source=str(tmp_path), format="text", chunk_tokens=8, max_length=8), gpt2
    )
    blocks = data.train
    assert all(len(b.ids) <= 8 and b.labels == b.ids for b in blocks)
    stream = [t for b in blocks for t in b.ids]
    eos = gpt2.eos_id
    assert stream.count(eos) == 2 and stream[-1] == eos
    assert gpt2.decode(stream) == (
        "The first document is here.<|endoftext|>"
        "A second one follows it, somewhat longer than the first.<|endoftext|>"
    )


def test_classification_labels_by_name_and_index(gpt2):
    cfg = DataConfig(source="x", format="classification", label_names=["ham", "spam"])
    assert (
        format_classification(
            Row({"text": "win cash", "label": "spam"}, "s:1"), gpt2, cfg, cfg.label_names
        ).label
        == 1
    )
    assert (
        format_classification(
            Row({"text": "hi mum", "label": 0}, "s:2"), gpt2, cfg, cfg.label_names
        ).label
        == 0
    )
    with pytest.raises(NanotuneError, match=r"s:3: label 'eggs' is not one of ham, spam"):
        format_classification(
            Row({"text": "x", "label": "eggs"}, "s:3"), gpt2, cfg, cfg.label_names
        )


@pytest.mark.slow
def test_truncation_never_cuts_the_answer(tmp_path, gpt2):
    long_prompt = "word " * 40
    rows = [
        {"prompt": long_prompt, "completion": "short answer"},
        {"prompt": "hi", "completion": "ok"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    base = dict(source=str(path), max_length=16)
    dropped = build_datasets(DataConfig(**base), gpt2)
    assert len(dropped.train) == 1 and dropped.stats["train"]["dropped_too_long"] == 1
    assert "dropped too long" in dropped.summary()
    with pytest.raises(NanotuneError, match=rf"{path}:1: example has \d+ tokens"):
        build_datasets(DataConfig(**base, truncation="error"), gpt2)
    cut = build_datasets(DataConfig(**base, truncate_prompt=True), gpt2)
    assert len(cut.train) == 2 and len(cut.train[0].ids) == 16
    assert supervised(gpt2, cut.train[0]) == "short answer<|endoftext|>"
    # An answer longer than max_length cannot be saved by cutting the prompt.
    path.write_text(json.dumps({"prompt": "hi", "completion": long_prompt}))
    with pytest.raises(NanotuneError, match=":1: example has"):
        build_datasets(DataConfig(**base, truncate_prompt=True, truncation="error"), gpt2)


def test_every_format_is_one_row_of_the_table():
    from typing import get_args

    from nanotune.data.config import Format
    from nanotune.data.pipeline import task_of
    from nanotune.eval.config import METRICS

    assert get_args(Format) == tuple(FORMATS)
    for name, spec in FORMATS.items():
        assert task_of(DataConfig(source="x", format=name)) == spec.task
        assert spec.metrics and set(spec.metrics) <= set(METRICS)
        assert spec.cacheable == (spec.task == "lm")  # the cache stores ExampleStores only
    with pytest.raises(NanotuneError, match="packing applies to language-model formats"):
        DataConfig(source="x", format="preference", pack=True)
    with pytest.raises(NanotuneError, match="chunk_tokens: 64 exceeds max_length=32"):
        DataConfig(source="x", format="text", chunk_tokens=64, max_length=32)

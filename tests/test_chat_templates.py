"""The chat templates of today's small chat models through nanotune's sandboxed renderer: Qwen3's
ChatML with its <think> handling, Gemma 3's turns, Phi-3's role markers. The template texts are
the models' own (tests/fixtures/chat_templates/*.json, each naming its source); nanotune's render
equals transformers' apply_chat_template on the same conversations, generation prompt included,
and generation stops on each family's end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

from nanotune.generate import GenerationConfig, default_stop_ids, generate_ids
from nanotune.models import PRESETS, Transformer
from nanotune.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FAMILIES = ("qwen3", "gemma3", "phi3")
# Each family's turn markers, made special tokens of the test tokenizer as in the real vocabularies.
MARKERS = {
    "qwen3": ["<think>", "</think>"],  # <|im_start|>/<|im_end|>: SmolLM2's vocabulary has them
    "gemma3": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
    "phi3": ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}


def fixture(family: str) -> dict:
    return json.loads((FIXTURES / f"{family}.json").read_text())


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir, tmp_path_factory) -> dict:
    """family -> (transformers' tokenizer, nanotune's), from one folder: SmolLM2's BPE with the
    family's markers as special tokens, its bos/eos and its chat template."""
    out = {}
    for family in FAMILIES:
        spec = fixture(family)
        hf = tf.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
        hf.add_special_tokens({"additional_special_tokens": MARKERS[family]})
        hf.bos_token = spec["bos_token"]
        hf.eos_token = spec["eos_token"]
        hf.chat_template = spec["chat_template"]
        d = tmp_path_factory.mktemp(family)
        hf.save_pretrained(d)
        hf = tf.AutoTokenizer.from_pretrained(d)
        ours = Tokenizer.from_dir(d)
        assert ours.chat_template == spec["chat_template"]
        out[family] = hf, ours
    return out


SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2 + 3?"}
REPLY = {"role": "assistant", "content": "5"}
USER2 = {"role": "user", "content": "  And times 4?\n"}  # Gemma trims each message
CONVERSATIONS = {
    "one-turn": [USER],
    "system": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, REPLY, USER2],
    "ends-with-reply": [USER, REPLY],
}
# Qwen3's reasoning: given as reasoning_content or inline as <think>…</think> in the content; the
# template keeps it on the reply after the last user turn and strips it from earlier ones.
THINK_REPLY = {"role": "assistant", "content": "<think>\n2 and 3 make 5.\n</think>\n\n5"}
REASONED = {"role": "assistant", "content": "20", "reasoning_content": "5 times 4 is 20."}
QWEN3_CONVERSATIONS = {
    "inline-think-last": [USER, THINK_REPLY],
    "inline-think-earlier": [USER, THINK_REPLY, USER2],
    "reasoning-content-last": [USER, REPLY, USER2, REASONED],
    "reasoning-content-earlier": [USER, REASONED, USER2],
    "tool-turns": [
        USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
        },
        {"role": "tool", "content": "5"},
        THINK_REPLY,
    ],
}


def cases():
    for family in FAMILIES:
        convs = CONVERSATIONS | (QWEN3_CONVERSATIONS if family == "qwen3" else {})
        for name, messages in convs.items():
            for gen in (True, False):
                yield pytest.param(
                    family, messages, gen, id=f"{family}-{name}-{'gen' if gen else 'nogen'}"
                )


@pytest.mark.slow
@pytest.mark.parametrize("family, messages, add_generation_prompt", list(cases()))
def test_render_equals_transformers(family, messages, add_generation_prompt, tokenizers):
    hf, ours = tokenizers[family]
    kwargs = dict(add_generation_prompt=add_generation_prompt)
    want = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    got = ours.apply_chat_template(messages, **kwargs)
    assert got == want
    assert ours.encode(got) == hf(want, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_enable_thinking_as_transformers(enable_thinking, tokenizers):
    hf, ours = tokenizers["qwen3"]
    messages = [SYSTEM, USER]
    want = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    got = ours.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    assert got == want
    assert got.endswith(
        "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    )


def test_what_each_template_writes(tokenizers):
    """The markers themselves (so equality above is not two renderers agreeing on nothing)."""
    _, qwen = tokenizers["qwen3"]
    text = qwen.apply_chat_template([USER, THINK_REPLY, USER2], add_generation_prompt=True)
    assert "2 and 3 make 5" not in text  # an earlier turn's reasoning is stripped
    assert text.endswith("<|im_start|>assistant\n")
    text = qwen.apply_chat_template([USER, THINK_REPLY])
    assert "<|im_start|>assistant\n<think>\n2 and 3 make 5.\n</think>\n\n5<|im_end|>\n" in text
    _, gemma = tokenizers["gemma3"]
    text = gemma.apply_chat_template([SYSTEM, USER, REPLY], add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 + 3?<end_of_turn>\n"
        "<start_of_turn>model\n5<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(Exception, match="alternate"):  # the template's own check
        gemma.apply_chat_template([USER, USER])
    _, phi = tokenizers["phi3"]
    text = phi.apply_chat_template([SYSTEM, USER], add_generation_prompt=True)
    assert (
        text
        == "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n"
    )
    assert phi.apply_chat_template([USER, REPLY]).endswith("5<|end|>\n<|endoftext|>")


def _always(vocab: int, token: int) -> Transformer:
    """A tiny decoder whose every next token is `token`: zero head weights and a bias on it."""
    torch.manual_seed(0)
    config = PRESETS["smollm2-135m-instruct"].config.with_(
        vocab_size=vocab,
        block_size=64,
        n_layer=1,
        n_head=2,
        n_kv_head=1,
        n_embd=16,
        intermediate_size=32,
        tie_embeddings=False,
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        bias = torch.zeros(vocab)
        bias[token] = 1.0
        model.lm_head.bias = nn.Parameter(bias)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_on_the_end_of_turn_token(family, tokenizers):
    _, ours = tokenizers[family]
    spec = fixture(family)
    end = ours.token_to_id(spec["end_of_turn"])
    assert end is not None and end in default_stop_ids(ours)
    if family != "qwen3":  # Qwen3's eos is <|im_end|> itself; elsewhere the turn ends first
        assert end != ours.eos_id
    model = _always(ours.vocab_size, end)
    prompt = ours.encode(ours.apply_chat_template([USER], add_generation_prompt=True))
    assert generate_ids(model, [prompt], GenerationConfig(max_new_tokens=5), ours) == [[]]
    unstopped = GenerationConfig(max_new_tokens=5, stop_token_ids=())
    assert generate_ids(model, [prompt], unstopped, ours) == [[end] * 5]

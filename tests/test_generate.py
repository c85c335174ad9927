"""Generation: parity with transformers' generate, KV cache, left padding, sampling, stop rules."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from nanotune.errors import NanotuneError
from nanotune.generate import (
    GenerationConfig,
    TextStream,
    chat_prompt,
    default_stop_ids,
    generate,
    generate_ids,
    stream,
)
from nanotune.models import ModelConfig, Transformer
from nanotune.weights.convert import config_from_hf, from_hf

VOCAB = 300  # bytes 0-255, three specials, room to spare


class ByteTokenizer:
    """Stand-in for nanotune.tokenizer.Tokenizer: one token per UTF-8 byte, plus specials."""

    special_tokens = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    eos_id = 256
    pad_id = None
    chat_template = "chatml"

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        ids: list[int] = []
        while text:
            for name, i in self.special_tokens.items():
                if allow_special and text.startswith(name):
                    ids.append(i)
                    text = text[len(name) :]
                    break
            else:
                ids.extend(text[0].encode())
                text = text[1:]
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        names = {i: n for n, i in self.special_tokens.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode(errors="replace"))
            buf = bytearray()
            if i in names and not skip_special:
                out.append(names[i])
        out.append(buf.decode(errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=False) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def tiny(family: str = "gpt2", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size=VOCAB, block_size=96)
    model = Transformer(cfg.with_(**kw))
    # Larger weights than the 0.02 init: decisive logits, so argmax never hangs on a near-tie.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


PROMPTS = [[5, 17, 9, 200, 33, 4, 61], [12, 8], [99, 100, 3, 250]]


def no_cache_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: re-run the whole sequence for every token, no cache, no mask."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


# --- parity with transformers ------------------------------------------------------------------


def hf_pair(family: str):
    """A random HF model and the same weights loaded into nanotune."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    if family == "gpt2":
        hf_cfg = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=96,
            n_embd=32,
            n_layer=2,
            n_head=4,
            initializer_range=0.15,
            bos_token_id=256,
            eos_token_id=256,
        )
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=96,
            initializer_range=0.15,
            tie_word_embeddings=False,
            bos_token_id=256,
            eos_token_id=256,
        )
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.eval()
    config = config_from_hf(hf_cfg.to_dict())
    model = Transformer(config)
    model.load_state_dict(from_hf(hf.state_dict(), config))
    return hf, model.eval()


def hf_greedy(hf, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        **kw,
    )
    return out[:, T:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_transformers_single_and_left_padded_batch(family):
    hf, model = hf_pair(family)
    cfg = GenerationConfig(max_new_tokens=32, stop_token_ids=())
    assert generate_ids(model, PROMPTS[:1], cfg) == hf_greedy(hf, PROMPTS[:1], 32)
    assert generate_ids(model, PROMPTS, cfg) == hf_greedy(hf, PROMPTS, 32)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_repetition_penalty_matches_transformers(family):
    hf, model = hf_pair(family)
    cfg = GenerationConfig(max_new_tokens=32, repetition_penalty=1.8, stop_token_ids=())
    ours = generate_ids(model, PROMPTS[:1], cfg)
    assert ours == hf_greedy(hf, PROMPTS[:1], 32, repetition_penalty=1.8)
    # The penalty changed something, so the comparison above is not vacuous.
    assert ours != generate_ids(model, PROMPTS[:1], GenerationConfig(32, stop_token_ids=()))


# --- cache, padding, sampling ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_equals_no_cache_and_batch_equals_one_by_one(family):
    model = tiny(family)
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=())
    batched = generate_ids(model, PROMPTS, cfg)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert got == no_cache_greedy(model, prompt, 20)
        assert generate_ids(model, [prompt], cfg) == [got]


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_seed_matters():
    model = tiny("llama")
    cfg = GenerationConfig(
        max_new_tokens=24, temperature=1.5, top_p=0.95, seed=7, stop_token_ids=()
    )
    first = generate_ids(model, PROMPTS, cfg)
    assert generate_ids(model, PROMPTS, cfg) == first
    other = GenerationConfig(
        max_new_tokens=24, temperature=1.5, top_p=0.95, seed=8, stop_token_ids=()
    )
    assert generate_ids(model, PROMPTS, other) != first
    greedy = generate_ids(model, PROMPTS, GenerationConfig(24, stop_token_ids=()))
    assert first != greedy


@pytest.mark.slow
def test_top_k_one_equals_greedy():
    model = tiny("gpt2")
    greedy = generate_ids(model, PROMPTS, GenerationConfig(24, stop_token_ids=()))
    sampled = GenerationConfig(24, temperature=2.0, top_k=1, seed=1, stop_token_ids=())
    assert generate_ids(model, PROMPTS, sampled) == greedy


@pytest.mark.slow
def test_tiny_top_p_equals_greedy():
    model = tiny("gpt2")
    greedy = generate_ids(model, PROMPTS, GenerationConfig(24, stop_token_ids=()))
    nucleus = GenerationConfig(24, temperature=1.0, top_p=1e-6, seed=1, stop_token_ids=())
    assert generate_ids(model, PROMPTS, nucleus) == greedy


def test_training_mode_is_restored():
    model = tiny("gpt2", dropout=0.5).train()
    cfg = GenerationConfig(8, stop_token_ids=())
    assert generate_ids(model, PROMPTS[:1], cfg) == [no_cache_greedy(model.eval(), PROMPTS[0], 8)]
    model.train()
    generate_ids(model, PROMPTS[:1], cfg)
    assert model.training


# --- stopping ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_stop_token_ends_each_row_on_its_own():
    model = tiny("gpt2")
    full = generate_ids(model, PROMPTS, GenerationConfig(20, stop_token_ids=()))
    # Stop on the 5th token row 0 produces: row 0 ends there; other rows stop only at that id.
    stop = full[0][4]
    got = generate_ids(model, PROMPTS, GenerationConfig(20, stop_token_ids=(stop,)))
    for row, ids in zip(full, got, strict=True):
        expected = row[: row.index(stop)] if stop in row else row
        assert ids == expected
    assert got[0] != full[0]


def scripted(prompt_len: int, text: str | list[int]) -> Transformer:
    """A model whose greedy output after a `prompt_len`-token prompt is exactly `text`'s bytes.

    Blocks are zeroed (the residual passes through), the embedding of position p is the unit
    vector e_p, and the head row of the token due at position p points along e_p.
    """
    script = list(text.encode()) if isinstance(text, str) else text
    n = 64
    model = Transformer(
        ModelConfig(
            vocab_size=VOCAB, block_size=n, n_layer=1, n_head=1, n_embd=n, tie_embeddings=False
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.wpe.weight.copy_(torch.eye(n))
        for i, t in enumerate(script):
            model.lm_head.weight[t, prompt_len - 1 + i] = 10.0
    return model.eval()


def test_scripted_model_says_its_script():
    model = scripted(3, [7, 7, 250, 9])
    cfg = GenerationConfig(4, stop_token_ids=())
    assert generate_ids(model, [[1, 2, 3]], cfg) == [[7, 7, 250, 9]]


def test_stop_strings_are_trimmed_and_end_generation():
    tok = ByteTokenizer()
    model = scripted(2, "one, two. three. four")
    cfg = GenerationConfig(30, stop=(". ", "x"), stop_token_ids=())
    assert generate(model, tok, ["hi"], cfg) == ["one, two"]
    ids = generate_ids(model, [tok.encode("hi")], cfg, tok)
    assert tok.decode(ids[0]) == "one, two. "  # generation ended as soon as the stop appeared
    # Past the script every logit is 0 and argmax picks token 0.
    assert generate(model, tok, ["hi"], GenerationConfig(30, stop_token_ids=())) == [
        "one, two. three. four" + "\x00" * 9
    ]


def test_default_stop_ids_are_eos_and_end_of_turn():
    tok = ByteTokenizer()
    assert sorted(default_stop_ids(tok)) == [256, 258]
    model = scripted(2, [*b"ok", 258, *b"more"])
    assert generate(model, tok, ["hi"], GenerationConfig(10)) == ["ok"]
    tok.chat_template = None  # a plain tokenizer stops at eos only
    assert default_stop_ids(tok) == [256]
    assert generate(model, tok, ["hi"], GenerationConfig(7)) == ["okmore"]


def test_stream_emits_whole_characters():
    tok = ByteTokenizer()
    model = scripted(2, "aé€b")  # é is 2 bytes, € is 3: each arrives over several tokens
    cfg = GenerationConfig(8, stop_token_ids=(0,))
    assert list(stream(model, tok, "hi", cfg)) == ["a", "é", "€", "b"]


def test_stream_holds_back_a_possible_stop_string():
    tok = ByteTokenizer()
    model = scripted(2, "abxyq-xyz-tail")
    cfg = GenerationConfig(20, stop=("xyz",), stop_token_ids=(0,))
    assert list(stream(model, tok, "hi", cfg)) == ["a", "b", "xyq", "-"]
    assert generate(model, tok, ["hi"], cfg) == ["abxyq-"]


def test_chat_prompt_uses_the_template():
    tok = ByteTokenizer()
    text = chat_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    with pytest.raises(NanotuneError, match="no chat template"):
        chat_prompt(tok, [{"role": "user", "content": "Hi"}])


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"temperature": float("nan")}, "temperature=nan must be a finite number"),
        ({"temperature": float("inf")}, "temperature=inf must be a finite number"),
        ({"top_p": float("nan")}, "top_p=nan must be a finite number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty=inf must be a finite number"),
        ({"temperature": "0.7"}, "temperature='0.7' must be a number"),
        ({"max_new_tokens": 2.5}, "max_new_tokens=2.5 must be an integer"),
    ],
)
def test_invalid_config_values_raise(kw, field):
    with pytest.raises(NanotuneError, match=field):
        GenerationConfig(**kw)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "nan"),
        ("--repetition-penalty", "inf"),
    ],
)
def test_cli_refuses_non_finite_sampling_flags(flag, value, capsys):
    from nanotune.cli import main

    # Checked before the model loads: the missing model would be a different error.
    assert main(["generate", "--model", "./no-such-model", "--prompt", "hi", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{value} must be a finite number") and "\n" not in err


@pytest.mark.slow
def test_prompt_longer_than_context_names_both_lengths():
    model = tiny("gpt2")  # block_size 96
    with pytest.raises(NanotuneError, match=r"prompt of 90 tokens.*context is 96.*leaves 86"):
        generate_ids(model, [[1] * 90], GenerationConfig(10))
    # Exactly at the limit is fine.
    assert len(generate_ids(model, [[1] * 86], GenerationConfig(10, stop_token_ids=()))[0]) == 10


def test_empty_prompt_is_an_error():
    with pytest.raises(NanotuneError, match="prompt 1 is empty"):
        generate_ids(tiny("gpt2"), [[1], []], GenerationConfig(4))


@pytest.mark.slow
def test_text_stream_pieces_join_to_the_full_decode():
    """Incremental decoding (a window per token) gives exactly the whole-output decode, on real
    GPT-2 BPE with multi-byte characters split across tokens; with a stop string, the text up
    to it."""
    from nanotune.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    text = "Grüße — 日本語 🤗 and plain words, again: Grüße 🤗🤗. The end."
    ids = tok.encode(text)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 50256, (200,), generator=g).tolist()
    for sequence in (ids, noise, ids + noise):
        ts = TextStream(tok)
        pieces = [ts.push(t) for t in sequence] + [ts.finish()]
        assert "".join(pieces) == tok.decode(sequence, skip_special=True)
        if sequence is ids:  # valid text: no piece ever shows half a character
            assert all("\ufffd" not in p for p in pieces)
    ts = TextStream(tok, stop=("again:",))
    pieces = [ts.push(t) for t in ids]
    assert ts.stopped and "".join(pieces) + ts.finish() == text[: text.index("again:")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_bf16_model_on_cpu_caches_keys_in_float32_with_the_outputs_of_a_bf16_cache(family):
    """Attention runs in float32 on CPU for bf16 inputs, so a float32 cache holds the same
    values as a bf16 one (cast once per token instead of per step) and changes no output."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(family)).eval().to(torch.bfloat16)
    assert model.cache_dtype == torch.float32
    assert Transformer(tiny_config(family)).cache_dtype == torch.float32  # float32 weights
    ids = torch.randint(0, 96, (2, 7))
    logits = {}
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            cache = model.init_cache(2, 12, dtype=dtype)
            steps = [model.lm_head(model.hidden(ids, cache=cache)[:, -1])]
            for t in (5, 9, 3):
                step = torch.full((2, 1), t)
                steps.append(model.lm_head(model.hidden(step, cache=cache)[:, -1]))
            logits[dtype] = torch.stack(steps)
    assert torch.equal(logits[torch.bfloat16], logits[torch.float32])

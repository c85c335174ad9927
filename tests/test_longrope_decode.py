"""Phi-3's longrope in the decoding engine (serve, GRPO): a sequence longer than the original
context turns by the long factors at every position, as transformers computes it, whichever way
the engine computes it: a prompt past it prefilled in chunks (the early chunks' positions are
within it), a prompt joining a decode step a row per token, a sequence crossing it while
decoding (its cache recomputed, as transformers' Phi-3 and `generate` do); the prefix cache
serves prompts within it only."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import _copy_files
from test_families import PROMPTS, hf_greedy, hf_model

from nanotune.decoding import engine as engine_mod
from nanotune.decoding.engine import Engine, Sampling
from nanotune.weights import load_model

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_thread")

N = 32
ORIGINAL = 16  # test_families' phi3-longrope: original_max_position_embeddings (and a window of 8)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, smollm2_tokenizer_dir):
    folder = tmp_path_factory.mktemp("phi3-longrope")
    hf_model("phi3-longrope").save_pretrained(folder)
    _copy_files(smollm2_tokenizer_dir, folder)
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder).eval(), folder


def prompts() -> list[list[int]]:
    """41 tokens (past the original context, prefilled in chunks), 20 (past it, joining a decode
    step), 16 (exactly the original context: short, crossing on its first new token), 13
    (crossing while decoding)."""
    gen = torch.Generator().manual_seed(11)
    long, exact = (torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (41, 16))
    return [long, PROMPTS[0], exact, PROMPTS[1]]


@pytest.mark.slow
def test_the_engine_decodes_longrope_phi3_past_the_original_context(phi3, monkeypatch):
    hf, folder = phi3
    model, tok = load_model(folder)
    assert model.longrope is not None and model.longrope[0] == ORIGINAL
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 5)
    batch = prompts()
    greedy = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    want = [hf_greedy(hf, p, N) for p in batch]
    engine = Engine(model, tok, max_batch=4)
    assert [s.output for s in engine.run(batch, [greedy] * 4)] == want
    assert engine.peak_running == 4
    # One at a time: the prompts within the original context (16 and 13 tokens) are served
    # from the prefix cache; those past it are computed afresh (their keys turned long).
    for p, w in zip(batch, want, strict=True):
        (again,) = engine.run([p], [greedy])
        assert again.output == w
    assert (engine._prefixes.hits, engine._prefixes.reused) == (2, 15 + 12)


@pytest.mark.slow
def test_without_the_long_turn_the_engine_decodes_otherwise(phi3):
    """The control: the same engine choosing factors by each forward's positions alone, with
    no recompute, decodes other tokens, so the parity above tests the long turn."""
    hf, folder = phi3
    model, tok = load_model(folder)
    engine = Engine(model, tok, max_batch=4)
    engine.longrope = None
    batch = prompts()
    greedy = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    got = [s.output for s in engine.run(batch, [greedy] * 4)]
    assert got != [hf_greedy(hf, p, N) for p in batch]

"""Sliding-window attention in the decoding engine (serve, GRPO): tiny models of each family that
slides, built with transformers' own classes, decode through the engine the greedy tokens
transformers decodes, for prompts longer than the window of 8 and 32 tokens past it: prompts
prefilled in chunks shorter than the window, prompts joining a decode step a row per token, a
prompt served again from the prefix cache, all batched together. (`generate` past the window
is tests/test_families.py's test_logits_and_greedy_tokens_equal_transformers.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from conftest import _copy_files
from test_families import FAMILIES, PROMPTS, WINDOW, hf_greedy, hf_model

from nanotune.decoding import engine as engine_mod
from nanotune.decoding.engine import Engine, Sampling
from nanotune.weights import load_model

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_thread")

N = 32
# Every family with a window: Mistral's on every layer, Qwen2's from max_window_layers on,
# Gemma 2's on alternate layers (soft-capped), Gemma 3's on five of six (its own RoPE base),
# Phi-3's on every layer.
CASES = [c for c in ("mistral", "qwen2-window", "gemma2", "gemma3", "phi3") if c in FAMILIES]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_tokenizer_dir):
    """case -> (the transformers model, its folder)."""
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(case)
        model = hf_model(case)
        if case == "phi3":  # a window on Phi-3-mini-4k's layout (test_families' phi3 has none)
            config = model.config
            config.sliding_window = WINDOW
            model = tf.Phi3ForCausalLM(config)
            model.load_state_dict(hf_model(case).state_dict())
        model.save_pretrained(d)
        _copy_files(smollm2_tokenizer_dir, d)
        out[case] = tf.AutoModelForCausalLM.from_pretrained(d).eval(), d
    return out


def long_prompt() -> list[int]:
    """41 tokens: past MERGED_PREFILL (32), so computed in prefill chunks."""
    return torch.randint(3, 49152, (41,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_the_engine_decodes_transformers_greedy_tokens_past_the_window(case, models, monkeypatch):
    hf, folder = models[case]
    model, tok = load_model(folder)
    assert any(model.config.window(i) == WINDOW for i in range(model.config.n_layer))
    # Chunks of 5 < window: a chunk's queries see keys of the chunks before it, up to the window.
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 5)
    engine = Engine(model, tok, max_batch=4)
    prompts = [long_prompt(), *PROMPTS]  # 41 (chunked prefill), 20 and 13 (joining rows)
    greedy = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    want = [hf_greedy(hf, p, N) for p in prompts]
    got = engine.run(prompts, [greedy] * len(prompts))
    assert [s.output for s in got] == want
    assert engine.peak_running == len(prompts)  # decoded in one batch
    # Again, one at a time: the prompts' keys now come from the prefix cache (all but the last
    # prompt token), the windowed layers' included.
    for p, w in zip(prompts, want, strict=True):
        (again,) = engine.run([p], [greedy])
        assert again.output == w
    assert engine._prefixes.hits == len(prompts)
    assert engine._prefixes.reused == sum(len(p) - 1 for p in prompts)


@pytest.mark.slow
def test_the_window_changes_what_the_engine_decodes(models):
    """The parity above means something: without the window the same weights decode otherwise
    past it."""
    hf, folder = models["mistral"]
    model, tok = load_model(folder)
    for block in model.blocks:
        block.attn.window = None
    model.config = model.config.with_(sliding_window=None)
    greedy = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    (unwindowed,) = Engine(model, tok).run([PROMPTS[0]], [greedy])
    assert unwindowed.output != hf_greedy(hf, PROMPTS[0], N)

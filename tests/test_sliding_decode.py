"""Sliding-window attention in decoding: tiny models of each family that slides, built with
transformers' own classes, decode the greedy tokens transformers decodes for prompts longer than
the window of 8 and 32 tokens past it, through `generate` (eager and compiled) and the engine
(serve, GRPO): prompts prefilled in chunks shorter than the window, prompts joining a decode step
a row per token, a prompt served again from the prefix cache, all batched together.

And what decoding keeps: a sliding-window layer's cache holds its window (a ring), not the
sequence, measured in bytes after long decodes, against a control without the window."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from conftest import _copy_files
from test_families import FAMILIES, PROMPTS, WINDOW, hf_greedy, hf_model

from nanotune.decoding import engine as engine_mod
from nanotune.decoding.engine import MERGED_PREFILL, Engine, Sampling, _SlotCache
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.models import PRESETS
from nanotune.models.transformer import KVCache, Transformer
from nanotune.weights import load_model
from nanotune.weights.gguf_export import export_gguf

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


# Each way of sliding: Mistral on every layer, Qwen2 on the upper half, Gemma 3 on five of six.
GENERATE_CASES = [c for c in ("mistral", "gemma3", "qwen2-window") if c in FAMILIES]


def without_window(model: Transformer) -> Transformer:
    """The same weights attending to every earlier key (the controls below)."""
    for block in model.blocks:
        block.attn.window = None
    model.config = model.config.with_(sliding_window=None)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_eager_and_compiled_decode_transformers_greedy_tokens_past_the_window(
    case, models, monkeypatch
):
    """Three prompts longer than the window, batched (two left-padded), 32 tokens each: eager
    decoding, then compiled (one graph over the static rings), and the long prompt alone."""
    torch._dynamo.reset()
    hf, folder = models[case]
    model, _ = load_model(folder)
    prompts = [long_prompt(), *PROMPTS]
    want = [hf_greedy(hf, p, N) for p in prompts]
    caches = []
    init_cache = model.init_cache
    monkeypatch.setattr(
        model, "init_cache", lambda *a, **k: caches.append(init_cache(*a, **k)) or caches[-1]
    )
    for compile in (False, True):
        config = GenerationConfig(max_new_tokens=N, stop_token_ids=(), compile=compile)
        assert generate_ids(model, prompts, config) == want
        # The windowed layers held their window of 8 columns, the global ones every column.
        cache = caches[-1]
        for i, k in enumerate(cache.k):
            assert k.shape[2] == (WINDOW if model.config.window(i) else cache.max_len)
    single = GenerationConfig(max_new_tokens=N, stop_token_ids=())
    assert generate_ids(model, prompts[:1], single) == want[:1]


def layer_bytes(cache: KVCache | _SlotCache) -> list[int]:
    """The bytes of keys and values each layer's cache holds."""
    return [k.nbytes + v.nbytes for k, v in zip(cache.k, cache.v, strict=True)]


def decoded_cache_bytes(model: Transformer, tok, new_tokens: int) -> dict[str, list[int]]:
    """Per layer, the bytes of the caches after decoding `new_tokens` past a 41-token prompt:
    `generate`'s (eager) and the engine's slot cache."""
    prompt = long_prompt()
    out = {}
    captured = []
    init_cache = model.init_cache
    model.init_cache = lambda *a, **k: captured.append(init_cache(*a, **k)) or captured[-1]
    try:
        config = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
        assert len(generate_ids(model, [prompt], config)[0]) == new_tokens
    finally:
        del model.init_cache
    out["generate"] = layer_bytes(captured[-1])
    engine = Engine(model, tok, prefix_cache_mb=0)
    cache = engine._cache
    cache.release = lambda: out.setdefault("engine", layer_bytes(cache))  # read as the run ends
    greedy = Sampling(max_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    (seq,) = engine.run([prompt], [greedy])
    assert len(seq.output) == new_tokens
    return out


@pytest.mark.slow
def test_a_windowed_layer_keeps_its_window_not_the_sequence(models):
    """Decoding 20 and then 80 tokens (to 121 of the context's 128): each windowed layer of
    Gemma 3 holds the same bytes after both, a ring of the window (the engine's: the window and
    MERGED_PREFILL - 1 more), while its global layer grows with the sequence. The control, the
    same model without its window, grows on every layer, so the bound is what is measured."""
    _, folder = models["gemma3"]
    model, tok = load_model(folder)
    c = model.config
    windowed = [i for i in range(c.n_layer) if c.window(i)]
    assert len(windowed) == 5
    short, long = (decoded_cache_bytes(model, tok, n) for n in (20, 80))
    row = c.kv_heads * c.hd * 4 * 2  # a key and a value of one position, float32
    for how, ring in (("generate", WINDOW), ("engine", WINDOW + MERGED_PREFILL - 1)):
        for i in range(c.n_layer):
            if i in windowed:
                assert short[how][i] == long[how][i] == ring * row
            else:
                assert long[how][i] > short[how][i] >= 61 * row
    plain = without_window(model)
    short, long = (decoded_cache_bytes(plain, tok, n) for n in (20, 80))
    for how in ("generate", "engine"):
        assert all(long[how][i] > short[how][i] for i in windowed)


def test_a_gemma3_270m_cache_holds_the_window_on_its_local_layers():
    """Gemma 3 270M's shape (18 layers, 1 kv head of 256, window 512 on 15 layers): the caches
    `generate` and the engine allocate (on the meta device), float32 as on CPU, at 4k and 32k
    tokens, against the same config without its window (what every layer held before)."""
    config = PRESETS["gemma3-270m"].config
    assert [config.window(i) for i in range(18)].count(None) == 3

    def mib(cache: KVCache | _SlotCache) -> float:
        extra = 0 if cache.key_pos is None else cache.key_pos.nbytes
        return (sum(layer_bytes(cache)) + extra) / 2**20

    class Shape:  # what the slot cache reads of a model
        def __init__(self, config):
            self.config, self.cache_dtype, self.device = config, torch.float32, "meta"

    def slots(config, length: int) -> _SlotCache:
        cache = _SlotCache(Shape(config), 1)
        cache.reserve(length, 1)
        return cache

    plain = config.with_(sliding_window=None)
    got = {
        n: (
            mib(KVCache(plain, 1, n, "meta", torch.float32)),
            mib(KVCache(config, 1, n, "meta", torch.float32)),
            mib(slots(plain, n)),
            mib(slots(config, n)),
        )
        for n in (4096, 32768)
    }
    per_position = 2 * 256 * 4 / 2**20  # MiB of a key and a value, one layer
    ring_pos = 512 * 8 / 2**20
    assert got[4096] == (
        18 * 4096 * per_position,  # 144 MiB
        3 * 4096 * per_position + 15 * 512 * per_position + ring_pos,  # 39 MiB
        18 * 4096 * per_position,
        3 * 4096 * per_position + 15 * 543 * per_position + 543 * 8 / 2**20,
    )
    assert got[32768][:2] == (1152.0, 207.00390625)
    assert got[32768][3] < 209


@pytest.mark.slow
def test_the_prefix_cache_serves_a_windowed_prefix_only_when_its_rings_hold_it(models):
    """After an 80-token prompt its entry's rings hold positions 41..79: a prompt sharing its
    first 75 tokens is served from them (it needs 68..74), one sharing its first 20 (needing
    13..19) is declined and computed afresh; both decode transformers' greedy tokens."""
    hf, folder = models["gemma3"]
    model, tok = load_model(folder)
    engine = Engine(model, tok, max_batch=2)
    gen = torch.Generator().manual_seed(5)
    first = torch.randint(3, 49152, (80,), generator=gen).tolist()
    tail = torch.randint(3, 49152, (10,), generator=gen).tolist()
    one = Sampling(max_tokens=1, temperature=0.0, stop_token_ids=())
    engine.run([first], [one])
    greedy = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    near, far = first[:75] + tail, first[:20] + tail
    (got,) = engine.run([near], [greedy])
    assert got.output == hf_greedy(hf, near, N)
    assert (engine._prefixes.hits, engine._prefixes.reused) == (1, 75)
    (got,) = engine.run([far], [greedy])
    assert got.output == hf_greedy(hf, far, N)
    assert engine._prefixes.hits == 1  # declined


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mistral", "gemma3"])
def test_a_gguf_loaded_model_decodes_past_the_window_keeping_its_window(case, models, tmp_path):
    """The window read back from a GGUF export's metadata bounds decoding alike: generate and
    the engine decode transformers' greedy tokens, the windowed layers' caches rings of 8."""
    hf, folder = models[case]
    model, tok = load_model(folder)
    back, tok = load_model(export_gguf(model, tok, tmp_path / "model.gguf", quant="f32"))
    c = back.config
    assert [c.window(i) for i in range(c.n_layer)] == [
        model.config.window(i) for i in range(c.n_layer)
    ]
    prompt = long_prompt()
    want = hf_greedy(hf, prompt, N)
    assert decoded_cache_bytes(back, tok, N) == decoded_cache_bytes(model, tok, N)
    assert generate_ids(back, [prompt], GenerationConfig(max_new_tokens=N, stop_token_ids=())) == [
        want
    ]
    greedy = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    assert [s.output for s in Engine(back, tok).run([prompt], [greedy])] == [want]

"""The decode engine behind `nanotune serve`, in process: one sequence's failure ends it alone,
the stop token is reported with its logprob, long prompts are computed in chunks to the same
answers, and the slot cache holds rows for what runs, not for `max_batch`."""

from __future__ import annotations

import threading

import pytest
import torch

from nanotune.decoding import engine as engine_mod
from nanotune.decoding.engine import BASE, Engine, Event, Sampling, Sequence, _SlotCache
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.weights import load_model


class Collect:
    """A request's side of a sequence: its events, and a flag when it finished."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    @property
    def end(self) -> Event:
        return self.events[-1]


@pytest.fixture
def served(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    yield engine, model, tok
    engine.stop(timeout=30)


def run(engine: Engine, tok, *specs: tuple[list[int], Sampling]) -> list[Collect]:
    sinks = [Collect() for _ in specs]
    engine.submit([Sequence(p, BASE, s, tok, c) for (p, s), c in zip(specs, sinks, strict=True)])
    for c in sinks:
        assert c.done.wait(60)
    return sinks


def greedy(model, tok, prompt: list[int], n: int) -> list[int]:
    config = GenerationConfig(max_new_tokens=n, stop_token_ids=())
    return generate_ids(model, [prompt], config, tok)[0]


def test_a_sequence_whose_logits_overflow_fails_alone(served):
    """temperature 1e-40 makes logits/T infinite: that request ends with an error, the one
    decoded beside it in the same batch runs to its end with the tokens it would have alone."""
    engine, model, tok = served
    prompt = tok.encode("Once upon a time")
    long = Sampling(max_tokens=40, temperature=0.0, stop_token_ids=())
    bad = Sampling(max_tokens=3, temperature=1e-40, stop_token_ids=())
    good, failed = run(engine, tok, (prompt, long), (tok.encode("hi"), bad))
    assert failed.end.finish_reason == "error" and "RuntimeError" in failed.end.error
    assert good.end.finish_reason == "length"
    assert [e.token for e in good.events[:-1]] == greedy(model, tok, prompt, 40)
    assert engine.load["running"] == 0 and engine._active == []


@pytest.mark.slow
def test_the_stop_token_is_reported_with_its_logprob(served):
    engine, model, tok = served
    prompt = tok.encode("The quick brown fox")
    want = greedy(model, tok, prompt, 4)
    stop = want[2]  # the third greedy token ends it
    s = Sampling(max_tokens=10, temperature=0.0, stop_token_ids=(stop,), logprobs=2)
    (c,) = run(engine, tok, (prompt, s))
    end = c.end
    assert end.finish_reason == "stop" and end.token == stop
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:2]]))[0, -1].float().log_softmax(-1)
    assert end.logprob.token == stop
    assert end.logprob.logprob == pytest.approx(float(logits[stop]), abs=1e-4)
    assert [t for t, _ in end.logprob.top] == logits.topk(2).indices.tolist()
    # The text holds the two tokens before it; the stop token is counted, not decoded.
    assert [e.token for e in c.events[:-1]] == want[:2]


def test_a_long_prompt_computed_in_chunks_scores_and_answers_as_one_forward(served, monkeypatch):
    engine, model, tok = served
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 7)
    prompt = tok.encode("One two three four five six seven eight nine ten eleven twelve " * 2)
    assert len(prompt) > 3 * 7
    s = Sampling(max_tokens=5, temperature=0.0, stop_token_ids=(), logprobs=0, echo=True)
    sinks = [Collect()]
    seq = Sequence(prompt, BASE, s, tok, sinks[0])
    engine.submit([seq])
    assert sinks[0].done.wait(60)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    got = [lp.logprob for lp in seq.prompt_logprobs[1:]]
    ref = [float(want[i, t]) for i, t in enumerate(prompt[1:])]
    assert seq.prompt_logprobs[0] is None and len(got) == len(prompt) - 1
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-4
    assert seq.output == greedy(model, tok, prompt, 5)


def test_echo_with_max_tokens_zero_generates_nothing(served):
    engine, _, tok = served
    s = Sampling(max_tokens=0, temperature=0.0, stop_token_ids=(), echo=True)
    (c,) = run(engine, tok, (tok.encode("Paris is"), s))
    assert c.end.finish_reason == "length" and [e.token for e in c.events] == [None]


def test_the_slot_cache_holds_rows_for_what_runs_and_keeps_them_when_it_grows(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    cache = _SlotCache(model, max_rows=16)
    cache.reserve(10, 1)
    assert cache.rows == 1 and cache.k[0].shape[0] == 1  # one request: one row, not sixteen
    cache.k[0][0, :, :10] = 1.0
    cache.reserve(100, 3)
    assert (cache.rows, cache.capacity) == (3, 128)  # rows as asked (>= double), length doubled
    assert cache.k[0][0, :, :10].eq(1).all() and cache.k[0][0, :, 10:].eq(0).all()
    cache.reserve(10, 40)
    assert cache.rows == 16  # never past max_batch


# issue 31: a Qwen3 and a Gemma 3 served with two adapters; Phi-3 (fused qkv_proj/gate_up_proj,
# partial rotary) and GPT-NeoX (per-head fused query_key_value) too. Phi-3's longrope past the
# original context has its own tests (tests/test_longrope_decode.py).
FAMILY_CASES = ("qwen3", "gemma3", "phi3", "gpt_neox")


@pytest.mark.slow
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_batching_across_adapters_is_exact_for_other_families(
    case, tmp_path, smollm2_tokenizer_dir
):
    """Six concurrent greedy requests over the base and two adapters of a tiny model of another
    family decode in one batch the tokens each decodes alone."""
    from conftest import _copy_files
    from test_families import FAMILIES, hf_model
    from test_serve import make_adapter

    from nanotune.jobs import artifacts

    if case not in FAMILIES:
        pytest.skip(f"{case} is not a supported family yet")
    base = tmp_path / "base"
    hf_model(case).save_pretrained(base)
    _copy_files(smollm2_tokenizer_dir, base)
    paths = {name: make_adapter(base, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))}
    model, tok = load_model(base)
    engine = Engine(model, tok, max_batch=8)
    ids = {None: BASE} | {name: engine.load_adapter(name, p).id for name, p in paths.items()}
    prompts = [tok.encode(t) for t in ("The quick brown fox", "Once upon a time", "1, 2, 3,")]
    jobs = [([None, "a", "b"][i % 3], prompts[i % 3], 6 + 2 * i) for i in range(6)]
    sinks = [Collect() for _ in jobs]
    seqs = [
        Sequence(p, ids[a], Sampling(max_tokens=n, temperature=0.0, stop_token_ids=()), tok, c)
        for (a, p, n), c in zip(jobs, sinks, strict=True)
    ]
    engine.submit(seqs)  # queued before the loop starts: admitted together
    engine.start()
    try:
        for c in sinks:
            assert c.done.wait(60)
    finally:
        engine.stop(timeout=30)
    assert engine.peak_running == len(jobs)
    for (a, p, n), seq in zip(jobs, seqs, strict=True):
        alone, _ = artifacts.load(str(base), None if a is None else str(paths[a]))
        assert seq.output == greedy(alone, tok, p, n), (case, a)

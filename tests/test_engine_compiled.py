"""Compiled decode steps in the serve/GRPO engine (`Engine(compile=True)`): the same greedy
tokens as the eager engine while sequences join and leave, one graph per batch bucket whatever
the cache length, eager where a step cannot be compiled (a joining prompt's rows, adapters
routed per row).

A compile costs tens of seconds of this CPU: one engine per family, every check on it."""

from __future__ import annotations

import pytest
import torch

from nanotune.decoding.engine import BASE, Engine, Sampling, Sequence
from nanotune.models.compiled_decode import batch_bucket
from nanotune.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_batch_buckets_are_powers_of_two_up_to_the_max_batch():
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert batch_bucket(11, 12) == 12  # a max batch that is no power of two is its own bucket


def spread(model) -> None:
    """Weights far from uniform, so greedy tokens vary (float32 throughout)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)


def gemma3_folder(tmp_path_factory, smollm2_tokenizer_dir):
    """Gemma 3: windowed layers (rings of 8 + 31 columns) beside a global one."""
    from conftest import _copy_files
    from test_families import hf_model

    folder = tmp_path_factory.mktemp("gemma3")
    hf_model("gemma3").save_pretrained(folder)
    _copy_files(smollm2_tokenizer_dir, folder)
    return folder


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_engine_decodes_the_eager_engines_greedy_tokens(
    family, tiny_llama_factory, tmp_path_factory, smollm2_tokenizer_dir, on_device
):
    """On CUDA (`make gpu-check`) the steps run as CUDA graphs."""
    if family == "llama":
        folder = tiny_llama_factory(seed=3)
    else:
        folder = gemma3_folder(tmp_path_factory, smollm2_tokenizer_dir)
    model, tok = load_model(folder)
    if family == "gemma3":
        c = model.config
        assert c.sliding_window and any(c.window(i) is None for i in range(c.n_layer))
    spread(model)
    model.to(on_device)
    # Prompts of 1 to 40 tokens (past the first cache length of 64 with their output, and
    # past the window), long ones prefilled alone, short ones joining a decode step; outputs
    # of different lengths, so the batch shrinks through every bucket.
    prompts = [[(7 * i + j) % 90 + 3 for j in range(n)] for i, n in enumerate((1, 5, 40, 3, 12))]
    sampling = [Sampling(max_tokens=m, temperature=0.0) for m in (40, 9, 30, 2, 17)]

    def decode(compile: bool):
        engine = Engine(model, tok, max_batch=4, prefix_cache_mb=0, compile=compile)
        return engine.run(prompts, sampling), engine

    want, _ = decode(False)
    assert len({tuple(s.output[:8]) for s in want}) == len(prompts)  # a meaningful comparison
    torch._dynamo.reset()
    before = graphs()
    got, engine = decode(True)
    assert [s.output for s in got] == [s.output for s in want]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    assert engine.compiled_steps >= 35  # of ~40 steps: all but those where a prompt joins
    # One graph per batch bucket seen (4, 2 and 1 rows), whatever the cache length (64, 128).
    assert graphs() - before <= 3
    # Another run: sequences of other lengths, the same graphs.
    before = graphs()
    again, _ = decode(True)
    assert graphs() == before
    assert [s.output for s in again] == [s.output for s in want]


@pytest.mark.slow
def test_steps_with_adapter_rows_run_eager_and_base_steps_compiled(tiny_llama_dir, tmp_path):
    """Base and adapter requests together: while an adapter row is in the batch the step runs
    eager (per-row routing is no static graph), once only base rows are left it runs compiled;
    every request decodes the tokens the eager engine gives it."""
    from test_serve import make_adapter

    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", 1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    sampling = [Sampling(max_tokens=m, temperature=0.0, stop_token_ids=()) for m in (24, 4, 20)]

    def decode(compile: bool):
        model, tok = load_model(tiny_llama_dir)
        spread(model)
        engine = Engine(model, tok, max_batch=4, prefix_cache_mb=0, compile=compile)
        a = engine.load_adapter("a", adapter).id
        seqs = [
            Sequence(p, adapter_id, s, tok, lambda event: None)
            for p, s, adapter_id in zip(prompts, sampling, (BASE, a, BASE), strict=True)
        ]
        engine.submit(seqs)
        while engine._waiting or engine._active:
            with torch.inference_mode():
                engine._step([engine._waiting.popleft() for _ in range(len(engine._waiting))])
        return seqs, engine

    want, _ = decode(False)
    got, engine = decode(True)
    assert [s.output for s in got] == [s.output for s in want]
    assert all(s.finish_reason == "length" for s in got)
    # 24 steps: the first computes the prompts (eager), 3 more carry the adapter's row.
    assert engine.compiled_steps == 24 - 4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_reduced_dtypes_decode_compiled(tiny_llama_dir, dtype):
    """`--dtype bfloat16 --compile` loads plain bf16 weights (oneDNN's packed layout is opaque
    to inductor), int8 its Int8Linear layers; both decode through the compiled steps, to the
    end, with tokens that mostly agree with eager decoding of the same weights (bf16 rounds
    differently in another kernel, so not bit-equal)."""
    from nanotune.jobs import artifacts
    from nanotune.models.linear import PackedLinear

    model, tok = artifacts.load(str(tiny_llama_dir), dtype=dtype, compile=True)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    sampling = [Sampling(max_tokens=10, temperature=0.0, stop_token_ids=())] * 2
    engine = Engine(model, tok, max_batch=2, prefix_cache_mb=0, compile=True)
    got = engine.run(prompts, sampling)
    assert [len(s.output) for s in got] == [10, 10]
    assert engine.compiled_steps == 9

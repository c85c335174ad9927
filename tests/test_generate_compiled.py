"""Compiled decoding (GenerationConfig.compile): the same greedy tokens as eager decoding, one
graph for every step and for another generation of the same batch size and cache bucket.

A compile costs ~1 minute of this CPU: one tiny model per family, two families."""

from __future__ import annotations

import pytest
import torch

from nanotune.generate import GenerationConfig, generate_ids
from nanotune.models import Transformer
from nanotune.models.compiled_decode import CACHE_BUCKET, cache_len
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def test_cache_length_buckets():
    assert cache_len(1, 4096) == CACHE_BUCKET
    assert cache_len(CACHE_BUCKET + 1, 4096) == 2 * CACHE_BUCKET
    assert cache_len(300, 200) == 200  # never past the context


@pytest.mark.device
@pytest.mark.parametrize(
    "config",
    [
        tiny_config("gpt2", vocab_size=96),
        # RoPE, grouped-query attention, and a window of 8 that 20 new tokens slide past
        tiny_config("llama", vocab_size=96, sliding_window=8),
    ],
    ids=["gpt2", "llama-window"],
)
@pytest.mark.slow
def test_compiled_greedy_decode_equals_eager(config, on_device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(config).eval().to(on_device)
    with torch.no_grad():  # far from uniform, so greedy tokens vary (float32 throughout)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    eager, compiled = (
        GenerationConfig(max_new_tokens=20, stop_token_ids=(), compile=c) for c in (False, True)
    )
    left_padded = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    want = generate_ids(model, left_padded, eager)
    assert len({tuple(t) for row in want for t in [row[:10]]}) == 3  # a meaningful comparison
    assert len(set(want[0])) > 3
    before = frames()
    assert generate_ids(model, left_padded, compiled) == want
    assert frames() - before == 1
    # Another generation, unpadded, of the same batch size and cache bucket: the same graph.
    same_length = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert generate_ids(model, same_length, compiled) == generate_ids(model, same_length, eager)
    assert frames() - before == 1

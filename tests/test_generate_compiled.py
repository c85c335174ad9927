"""Compiled decoding (GenerationConfig.compile): the same greedy tokens as eager decoding, one
graph for every step and for another generation of the same batch size, whatever its length.

A compile costs ~1 minute of this CPU: one tiny model per family, two families."""

from __future__ import annotations

import pytest
import torch

from nanotune.generate import GenerationConfig, generate_ids
from nanotune.models import Transformer
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


@pytest.mark.device
@pytest.mark.parametrize(
    "config",
    [
        tiny_config("gpt2", vocab_size=96),
        # RoPE, grouped-query attention, and a window of 8 that 20 new tokens slide past
        tiny_config("llama", vocab_size=96, sliding_window=8),
        # A window of 40: rings as long as the generations below it (25, 23), then 40 (42)
        tiny_config("llama", vocab_size=96, sliding_window=40),
    ],
    ids=["gpt2", "llama-window", "llama-long-window"],
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
    # Other generations of the same batch size, unpadded, of other lengths (a cache of 3 + 20
    # and of 12 + 30 columns, against 25 above): the same graph.
    for prompts, n in (
        ([[1, 2, 3], [4, 5, 6], [7, 8, 9]], 20),
        ([[1] * 12, [2] * 12, [3] * 12], 30),
    ):
        again, want = (
            generate_ids(
                model, prompts, GenerationConfig(max_new_tokens=n, stop_token_ids=(), compile=c)
            )
            for c in (True, False)
        )
        assert again == want
    assert frames() - before == 1

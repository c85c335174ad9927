"""Batches: packing equals padding numerically, never leaks across examples, is deterministic."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from nanotune.data import IGNORE, ClassExample, Example, efficiency, epoch_batches
from nanotune.models import Transformer

PAD = 0
EOS = 7


def lm_examples(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(lo, hi)
        ids = [rng.randrange(8, 64) for _ in range(L - 1)] + [EOS]
        k = rng.randint(1, L - 1)  # prompt length: the rest is supervised
        out.append(Example(ids, [IGNORE] * k + ids[k:]))
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request) -> Transformer:
    torch.manual_seed(0)
    cfg = tiny_config(request.param, vocab_size=64, tie_embeddings=True)
    return Transformer(cfg).eval()


def per_example_losses(model: Transformer, batch: dict) -> list[float]:
    """Summed CE of every example in a batch (examples told apart by doc_ids, or one per row)."""
    kwargs = {k: batch[k] for k in ("positions", "doc_ids") if k in batch}
    with torch.no_grad():
        logits = model.lm_head(model.hidden(batch["input_ids"], **kwargs))
    ce = F.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), reduction="none", ignore_index=IGNORE
    ).view_as(batch["targets"])
    doc = batch.get("doc_ids", torch.zeros_like(batch["targets"]))
    out = []
    for b in range(ce.shape[0]):
        for d in doc[b].unique().tolist():
            if d >= 0:
                out.append(ce[b][doc[b] == d].sum().item())
    return out


@pytest.mark.slow
def test_packed_losses_equal_padded(model):
    examples = lm_examples(24)
    padded = epoch_batches(examples, 4, seed=1, epoch=0, pad_id=PAD, shuffle=False)
    packed = epoch_batches(
        examples, 2, seed=1, epoch=0, pad_id=PAD, pack=True, max_length=40, shuffle=False
    )
    assert sum(b["n_examples"] for b in packed) == 24
    assert packed[0]["doc_ids"].max() > 0  # several examples really share a row
    ref = sorted(x for b in padded for x in per_example_losses(model, b))
    got = sorted(x for b in packed for x in per_example_losses(model, b))
    assert len(got) == len(ref) == 24
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=1e-5)
    assert sum(b["n_supervised"] for b in packed) == sum(b["n_supervised"] for b in padded)


def test_packing_has_no_attention_across_examples(model):
    examples = lm_examples(6, seed=3, lo=5, hi=9)
    batch = epoch_batches(examples, 1, 0, 0, pad_id=PAD, pack=True, max_length=64, shuffle=False)[0]
    assert batch["n_examples"] == 6
    kwargs = {"positions": batch["positions"], "doc_ids": batch["doc_ids"]}
    with torch.no_grad():
        before = model(batch["input_ids"], **kwargs)
        changed = batch["input_ids"].clone()
        target_doc = batch["doc_ids"] == 2
        changed[target_doc] = (changed[target_doc] + 5) % 64
        after = model(changed, **kwargs)
    others = ~target_doc & (batch["doc_ids"] >= 0)
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[target_doc], after[target_doc])


def test_targets_shift_within_examples_and_positions_restart():
    a = Example([10, 11, 12], [IGNORE, 11, 12])
    b = Example([20, 21], [20, 21])
    batch = epoch_batches([a, b], 1, 0, 0, pad_id=PAD, pack=True, max_length=8, shuffle=False)[0]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch["targets"].tolist() == [[11, 12, IGNORE, 21, IGNORE]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1]]


def test_pad_equal_to_eos_keeps_eos_supervised():
    short = Example([30, 31, EOS], [IGNORE, 31, EOS])
    long = Example([40, 41, 42, 43, EOS], [IGNORE, IGNORE, 42, 43, EOS])
    batch = epoch_batches([short, long], 2, 0, 0, pad_id=EOS, shuffle=False)[0]
    assert batch["input_ids"].tolist() == [[30, 31, EOS, EOS, EOS], [40, 41, 42, 43, EOS]]
    assert batch["targets"].tolist() == [
        [31, EOS, IGNORE, IGNORE, IGNORE],
        [IGNORE, 42, 43, EOS, IGNORE],
    ]
    assert (batch["n_real"], batch["n_supervised"], batch["n_computed"]) == (8, 5, 10)
    assert efficiency([batch]) == {"real_fraction": 0.8, "supervised_fraction": 0.5}


def test_epoch_batches_deterministic_and_complete():
    examples = [Example([i + 1] * (2 + i % 5), [i + 1] * (2 + i % 5)) for i in range(53)]

    def firsts(batches):
        out = []
        for b in batches:
            for row, doc in zip(
                b["input_ids"].tolist(),
                b.get("doc_ids", torch.zeros_like(b["input_ids"])).tolist(),
                strict=True,
            ):
                seen = set()
                for t, d in zip(row, doc, strict=True):
                    if d >= 0 and t != PAD and (d, t) not in seen:
                        seen.add((d, t))
                        out.append(t)
        return out

    for kw in ({}, {"group_by_length": True}, {"pack": True, "max_length": 12}):
        e0 = epoch_batches(examples, 4, seed=5, epoch=0, pad_id=PAD, **kw)
        again = epoch_batches(examples, 4, seed=5, epoch=0, pad_id=PAD, **kw)
        e1 = epoch_batches(examples, 4, seed=5, epoch=1, pad_id=PAD, **kw)
        other_seed = epoch_batches(examples, 4, seed=6, epoch=0, pad_id=PAD, **kw)
        assert all(
            torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(e0, again, strict=True)
        )
        assert sorted(firsts(e0)) == list(range(1, 54)), kw  # every example exactly once
        assert sorted(firsts(e1)) == list(range(1, 54)), kw
        assert firsts(e0) != firsts(e1) and firsts(e0) != firsts(other_seed), kw


def test_group_by_length_pads_less():
    examples = lm_examples(200, seed=4, lo=2, hi=60)
    plain = efficiency(epoch_batches(examples, 8, 0, 0, pad_id=PAD))
    grouped = efficiency(epoch_batches(examples, 8, 0, 0, pad_id=PAD, group_by_length=True))
    packed = efficiency(epoch_batches(examples, 8, 0, 0, pad_id=PAD, pack=True, max_length=64))
    assert grouped["real_fraction"] > plain["real_fraction"] + 0.2
    assert packed["real_fraction"] > 0.9


def test_drop_last_keeps_only_full_batches():
    examples = lm_examples(10)
    for kw in ({}, {"group_by_length": True}):
        batches = epoch_batches(examples, 4, 0, 0, pad_id=PAD, drop_last=True, **kw)
        assert [b["n_examples"] for b in batches] == [4, 4]


def test_classification_batch():
    examples = [ClassExample([5, 6, 7], 1), ClassExample([8], 0), ClassExample([9, 9], 1)]
    (batch,) = epoch_batches(examples, 3, 0, 0, task="classification", pad_id=EOS, shuffle=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, EOS, EOS], [9, 9, EOS]]
    assert batch["lengths"].tolist() == [3, 1, 2]
    assert batch["class_labels"].tolist() == [1, 0, 1]
    assert (batch["n_real"], batch["n_computed"], batch["n_supervised"]) == (6, 9, 3)

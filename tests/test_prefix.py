"""Less work for frozen layers: a classifier's last block runs at the pooled position only, and
the frozen prefix of a last_n classifier is computed once per text and reused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from nanotune.methods import MethodConfig, SequenceClassifier, apply_method
from nanotune.models import Transformer
from nanotune.training import TrainConfig, Trainer, objective_for
from nanotune.training.prefix import PrefixStore

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96


def classifier(family: str = "gpt2", n_layer: int = 3, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    body = Transformer(tiny_config(family, n_layer=n_layer, dropout=dropout))
    return SequenceClassifier(body, 2, ["no", "yes"])


def rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n right-padded rows of 3-20 real tokens (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 21, (n,), generator=g)
    ids = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    for b, k in enumerate(lengths.tolist()):
        ids[b, :k] = torch.randint(1, V, (k,), generator=g)
    return ids, lengths


def every_position_then_pick(clf: SequenceClassifier, ids, lengths) -> torch.Tensor:
    """The classifier as written before: final-normed states everywhere, then the last real one."""
    h = clf.body.hidden(ids)
    return clf.score(h[torch.arange(len(ids)), lengths - 1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["last_n", "full"])
def test_pooled_last_block_equals_computing_every_position(family, method):
    clf = classifier(family)
    apply_method(clf, MethodConfig(name=method, last_n=1))
    ids, lengths = rows(6, seed=1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    pooled = clf(ids, lengths)
    reference = every_position_then_pick(clf, ids, lengths)
    assert pooled.shape == (6, 2)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=1e-5)
    grads = []
    for logits in (pooled, reference):
        clf.zero_grad()
        F.cross_entropy(logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in clf.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_frozen_prefix_layers_follow_what_trains():
    clf = classifier(n_layer=4)
    apply_method(clf, MethodConfig(name="last_n", last_n=1))
    assert clf.frozen_prefix_layers() == (3, "")
    apply_method(clf, MethodConfig(name="last_n", last_n=3))
    assert clf.frozen_prefix_layers() == (1, "")
    apply_method(clf, MethodConfig(name="full"))
    assert clf.frozen_prefix_layers() == (0, "")
    apply_method(clf, MethodConfig(name="lora", r=2, alpha=4, targets="all-linear"))
    assert clf.frozen_prefix_layers() == (0, "")  # every block holds adapters that train
    dropped = classifier(n_layer=4, dropout=0.1)
    apply_method(dropped, MethodConfig(name="last_n", last_n=1))
    n, why = dropped.frozen_prefix_layers()
    assert n == 0 and "dropout 0.1" in why


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_prefix_equals_the_recomputed_one_and_is_computed_without_autograd(family, tmp_path):
    clf = classifier(family)
    apply_method(clf, MethodConfig(name="last_n", last_n=1))
    store = PrefixStore(2**30, tmp_path / "spill.bin")
    assert clf.cache_frozen_prefix(store) == 2
    grad_enabled = []
    clf.body.blocks[0].register_forward_hook(
        lambda *_: grad_enabled.append(torch.is_grad_enabled())
    )
    ids, lengths = rows(5, seed=2)
    first = clf(ids, lengths)  # computes and stores the prefix
    assert grad_enabled == [False] and len(store) == 5 and store.misses == 1
    again = clf(ids, lengths)  # reads it
    assert grad_enabled == [False] and store.hits == 1
    assert torch.equal(first, again)
    # The stored states are what the frozen blocks compute for each row, in any batch.
    body = clf.body
    for b, n in enumerate(lengths.tolist()):
        alone = store.get(ids[b : b + 1, :n], lengths[b : b + 1])
        positions = torch.arange(n)[None]
        x, rope = body.embed(ids[b : b + 1, :n], positions)
        recomputed = body.run_blocks(x, rope, None, None, range(2))
        torch.testing.assert_close(alone, recomputed, atol=1e-6, rtol=1e-5)
    # A batch of other compositions and paddings reads the same rows.
    order = torch.tensor([4, 2, 0])
    sub = ids[order, : int(lengths[order].max())]
    torch.testing.assert_close(clf(sub, lengths[order]), first[order], atol=1e-5, rtol=1e-5)
    assert clf.cache_frozen_prefix(None) == 0
    grad_enabled.clear()
    clf(ids, lengths)
    assert grad_enabled == [True]  # without a store: recomputed, as any forward


def test_a_store_past_its_ram_budget_spills_to_a_file_it_deletes(tmp_path):
    ids, lengths = rows(6, seed=3)
    states = torch.randn(6, ids.shape[1], 8)
    spill = tmp_path / "run" / "prefix.bin"
    store = PrefixStore(ram_bytes=int(lengths[:2].sum()) * 8 * 4, spill_path=spill)
    store.put(ids, lengths, states)
    assert store.held == int(lengths[:2].sum()) * 8 * 4 and store.spilled > 0 and spill.exists()
    got = store.get(ids, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(got[b, :n], states[b, :n]) and not got[b, n:].any()
    assert store.get(torch.full_like(ids, 5), lengths) is None
    assert "in RAM" in store.describe() and "prefix.bin" in store.describe()
    store.close()
    assert not spill.exists() and len(store) == 0


def batches_for(n_batches: int, seed: int) -> list[dict]:
    out = []
    for i in range(n_batches):
        ids, lengths = rows(8, seed=seed + i)
        labels = (ids[:, 0] > V // 2).long()
        out.append({"input_ids": ids, "lengths": lengths, "class_labels": labels})
    return out


def run(tmp_path, capsys, name: str, **train) -> tuple[list[dict], str, dict]:
    clf = classifier(n_layer=3, dropout=train.pop("dropout", 0.0))
    apply_method(clf, MethodConfig(name="last_n", last_n=1))
    train_batches, val = batches_for(3, seed=10), batches_for(1, seed=50)

    # Each epoch shuffles rows across batches, as the data pipeline does.
    def epoch(e: int) -> list[dict]:
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(e))
        cat = {
            k: torch.cat(
                [
                    F.pad(b[k], (0, 20 - b[k].shape[-1])) if k == "input_ids" else b[k]
                    for b in train_batches
                ]
            )
            for k in train_batches[0]
        }
        return [{k: v[perm[i : i + 8]] for k, v in cat.items()} for i in range(0, 24, 8)]

    cfg = TrainConfig(
        lr=1e-2, epochs=4, micro_batch_size=4, eval_every=3, schedule="constant", **train
    )
    run_dir = tmp_path / name
    Trainer(
        clf,
        cfg,
        epoch,
        run_dir,
        val_batches=val,
        objective=objective_for("classification"),
        progress=False,
    ).fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (
        records,
        capsys.readouterr().out,
        {n: p.detach().clone() for n, p in clf.named_parameters()},
    )


@pytest.mark.slow
def test_a_run_with_the_cached_prefix_trains_as_one_that_recomputes_it(tmp_path, capsys):
    cached, said, weights = run(tmp_path, capsys, "cached")
    spilled, spill_said, spill_weights = run(tmp_path, capsys, "spilled", frozen_prefix_ram_mib=0)
    plain, plain_said, plain_weights = run(tmp_path, capsys, "plain", frozen_prefix_cache=False)
    losses = [
        [r["loss"] for r in recs if "loss" in r and "step" in r and "lr" in r]
        for recs in (cached, spilled, plain)
    ]
    assert len(losses[0]) == 12
    assert losses[0] == losses[1]  # RAM or file: the same bytes
    torch.testing.assert_close(
        torch.tensor(losses[0]), torch.tensor(losses[2]), atol=1e-5, rtol=1e-5
    )
    for name, w in weights.items():
        assert torch.equal(w, spill_weights[name])
        torch.testing.assert_close(w, plain_weights[name], atol=1e-5, rtol=1e-4)
    assert "frozen prefix: blocks 0-1 run once per row" in said
    # 24 training rows and 8 validation rows, each computed once; the rest were read.
    assert "frozen prefix: 32 rows" in said and "micro-batches read" in said
    assert "frozen prefix" not in plain_said
    assert not list((tmp_path / "spilled").glob("frozen-prefix*"))  # the spill file is gone
    assert "MiB in frozen-prefix-rank0.bin" in spill_said


def test_dropout_keeps_the_prefix_recomputed_and_says_why(tmp_path, capsys):
    _, said, _ = run(tmp_path, capsys, "dropout", dropout=0.1)
    assert "frozen prefix computed at every pass: dropout 0.1" in said

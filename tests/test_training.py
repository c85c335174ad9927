"""The training loop on tiny random models and synthetic batches (batch contract of design.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from nanotune.errors import NanotuneError
from nanotune.models import ModelConfig, Transformer
from nanotune.training import (
    ClassificationObjective,
    LMObjective,
    TrainConfig,
    Trainer,
    build_optimizer,
    lm_loss_sum,
    lr_at,
    objective_for,
)
from nanotune.training.checkpoint import step_dirs

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    )


def lm_batch(lengths: list[int], prompts: list[int], seed: int = 0) -> dict:
    """Right-padded LM batch: targets shifted, prompt and padding positions -100."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    targets = torch.full((len(lengths), T), -100)
    for r, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        ids[r, :n] = torch.randint(1, V, (n,), generator=g)
        targets[r, p : n - 1] = ids[r, p + 1 : n]
    return {"input_ids": ids, "targets": targets}


def uneven_batch(seed: int = 0) -> dict:
    # Label counts per pair of rows differ a lot, so a mean of micro-batch means would be wrong.
    return lm_batch([20, 18, 4, 5, 12, 3, 16, 9], [2, 1, 2, 3, 8, 1, 1, 6], seed)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fit(model, cfg, batches, run_dir, **kw):
    return Trainer(model, cfg, lambda epoch: batches, run_dir, progress=False, **kw).fit()


def test_label_positions_loss_equals_full_logits_masked_ce():
    model = tiny()
    batch = uneven_batch()
    n = LMObjective().count(batch)
    loss = lm_loss_sum(model, batch) / n
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(batch["input_ids"])
    ref = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert abs(loss.item() - ref.item()) <= 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() <= 1e-5


def test_accumulation_matches_one_big_batch(tmp_path):
    batch = uneven_batch()
    # Adam's first step is ~lr * sign(g): a large eps keeps float noise in near-zero gradients
    # from being amplified to lr-sized differences; real accumulation errors stay visible.
    common = dict(lr=1e-2, eps=1e-4, max_steps=1, max_grad_norm=None, weight_decay=0.1)
    big, acc = tiny(), tiny()
    fit(big, TrainConfig(micro_batch_size=8, grad_accum=1, **common), [batch], tmp_path / "a")
    fit(acc, TrainConfig(micro_batch_size=2, grad_accum=4, **common), [batch], tmp_path / "b")
    for (n, a), b in zip(params(big).items(), params(acc).values(), strict=True):
        assert (a - b).abs().max() <= 1e-6, n
    # The test is sensitive: averaging per-micro-batch means gives a visibly different gradient.
    model = tiny()
    parts = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    obj = LMObjective()
    mean_of_means = sum(lm_loss_sum(model, p) / obj.count(p) for p in parts) / 4
    true_mean = lm_loss_sum(model, batch) / obj.count(batch)
    g1 = torch.autograd.grad(mean_of_means, model.wte.weight)[0]
    g2 = torch.autograd.grad(true_mean, model.wte.weight)[0]
    assert (g1 - g2).abs().max() > 1e-4


def test_same_seed_same_weights_with_dropout(tmp_path):
    batches = [uneven_batch(s) for s in range(3)]
    cfg = TrainConfig(lr=1e-2, max_steps=3, micro_batch_size=4, grad_accum=2, seed=7)
    runs = []
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        model = tiny(dropout=0.2)
        cfg.seed = seed
        fit(model, cfg, batches, tmp_path / name)
        runs.append(params(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])  # dropout draws differ


@pytest.mark.slow
def test_loss_falls_and_metrics_written(tmp_path):
    batch = uneven_batch()
    cfg = TrainConfig(lr=3e-3, max_steps=30, micro_batch_size=4, grad_accum=2, warmup_steps=3)
    model = tiny()
    before = (lm_loss_sum(model, batch) / LMObjective().count(batch)).item()
    result = fit(model, cfg, [batch], tmp_path)
    assert result.step == 30 and result.train_loss < before - 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert lines[0]["labels"] == LMObjective().count(batch)
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(lines[0])
    # The report's figures: parameter counts once, loop seconds on every record.
    total = sum(p.numel() for p in model.parameters())
    assert lines[0]["trainable_params"] == lines[0]["total_params"] == total
    assert not any("trainable_params" in r for r in lines[1:])
    elapsed = [r["elapsed_s"] for r in lines]
    assert 0 < elapsed[0] and elapsed == sorted(elapsed)


def test_schedules_numerically():
    c = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, 14, c) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, 14, c) == pytest.approx(1.0)
    assert lr_at(9, 14, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, 14, c) == pytest.approx(0.1)
    lin = TrainConfig(lr=2.0, warmup_ratio=0.2, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(1, 10, lin) == pytest.approx(2.0 * 2 / 3)  # warmup = 2 steps
    assert lr_at(6, 10, lin) == pytest.approx(2.0 * (1 - 4 / 8))
    const = TrainConfig(lr=0.5, warmup_steps=1, schedule="constant")
    assert [lr_at(s, 10, const) for s in (0, 1, 9)] == pytest.approx([0.25, 0.5, 0.5])


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny()
    model.wte.weight.requires_grad_(True)
    before = params(model)
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decay can move a weight
    opt.step()
    after = params(model)
    for n, p in after.items():
        if p.ndim < 2 or n in ("wte.weight", "wpe.weight"):
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5)), n
    frozen = tiny()
    for n, p in frozen.named_parameters():
        p.requires_grad_(n.startswith("blocks.1."))
    opt = build_optimizer(frozen, TrainConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for n, p in frozen.named_parameters() if n.startswith("blocks.1.")}


class ScriptedEval(LMObjective):
    """Eval losses follow a script, so early stopping and best tracking are exact."""

    def __init__(self, losses: list[float]) -> None:
        self.losses = iter(losses)

    def summarize(self, sums):
        return {"loss": next(self.losses)}


def test_early_stopping_restores_best(tmp_path):
    batches = [uneven_batch(s) for s in range(4)]
    cfg = TrainConfig(
        lr=1e-2,
        max_steps=40,
        eval_every=2,
        early_stopping_patience=2,
        micro_batch_size=8,
        schedule="constant",
    )
    model = tiny()
    obj = ScriptedEval([3.0, 2.0, 2.5, 2.6, 1.0])
    result = fit(model, cfg, batches, tmp_path / "a", val_batches=[batches[0]], objective=obj)
    assert result.stopped_early and result.step == 8
    assert result.best_step == 4 and result.eval == {"loss": 2.0}
    # Constant lr without warm-up: the first 4 steps of the long run equal a 4-step run.
    reference = tiny()
    ref_cfg = TrainConfig(lr=1e-2, max_steps=4, micro_batch_size=8, schedule="constant")
    fit(reference, ref_cfg, batches, tmp_path / "b")
    got, want = params(model), params(reference)
    assert all(torch.equal(got[n], want[n]) for n in got)


def test_checkpoints_pruned_and_complete(tmp_path):
    batches = [uneven_batch(s) for s in range(3)]
    cfg = TrainConfig(lr=1e-2, max_steps=7, save_every=2, keep_last=3, micro_batch_size=8)
    fit(tiny(), cfg, batches, tmp_path / "a", resolved_config={"train": {"lr": 1e-2}})
    # Every 2 steps, at each end of epoch (3 batches) and at the end: 2, 3, 4, 6, 7; 3 kept.
    dirs = step_dirs(tmp_path / "a" / "checkpoints")
    assert [d.name for d in dirs] == ["step-4", "step-6", "step-7"]
    assert not list((tmp_path / "a" / "checkpoints").glob(".tmp-*"))
    state = torch.load(dirs[1] / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_index"]) == (6, 1, 3)  # epoch 1 done
    assert json.loads((dirs[1] / "config.json").read_text()) == {"train": {"lr": 1e-2}}
    assert set(load_file(dirs[1] / "trainable.safetensors")) == set(params(tiny()))
    sums = json.loads((dirs[1] / "checksums.json").read_text())
    assert sorted(sums) == ["config.json", "state.pt", "trainable.safetensors"]
    # Without save_every a run still leaves resumable checkpoints: each epoch's and the last.
    cfg.save_every = 0
    fit(tiny(), cfg, batches, tmp_path / "b")
    assert [d.name for d in step_dirs(tmp_path / "b" / "checkpoints")] == [
        "step-3",
        "step-6",
        "step-7",
    ]


class TinyClassifier(nn.Module):
    """Stand-in honouring the classifier contract: forward(input_ids, lengths) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny()
        self.score = nn.Linear(32, 2, bias=False)

    def forward(self, input_ids, lengths):
        h = self.body.hidden(input_ids)
        return self.score(h[torch.arange(len(h)), lengths - 1])


@pytest.mark.slow
def test_classification_trains_and_reports_accuracy(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (16, 6), generator=g)
    labels = (ids[:, 0] > V // 2).long()
    lengths = torch.full((16,), 6)
    batch = {"input_ids": ids, "lengths": lengths, "class_labels": labels}
    model = TinyClassifier()
    objective = objective_for("classification")
    assert isinstance(objective, ClassificationObjective)
    cfg = TrainConfig(lr=1e-2, max_steps=15, micro_batch_size=8, grad_accum=2, eval_every=15)
    result = fit(model, cfg, [batch], tmp_path, val_batches=[batch], objective=objective)
    assert result.eval["accuracy"] == 1.0 and result.eval["loss"] < 0.3


def test_bad_train_inputs():
    with pytest.raises(NanotuneError, match="train.lr"):
        TrainConfig(lr=0)
    with pytest.raises(NanotuneError, match="train.betas"):
        TrainConfig(betas=(0.9, 1.5))
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NanotuneError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())
    with pytest.raises(NanotuneError, match="no batches"):
        Trainer(tiny(), TrainConfig(), lambda epoch: [], "unused", progress=False)


def test_fused_cross_entropy_equals_torch():
    from nanotune.training.losses import cross_entropy_sum

    torch.manual_seed(0)
    x = torch.randn(37, 1000, requires_grad=True)
    t = torch.randint(0, 1000, (37,))
    ours = cross_entropy_sum(x * 1.0, t)  # * 1.0: the loss owns (and reuses) its logits buffer
    (0.5 * ours).backward()
    got, x.grad = x.grad, None
    want = torch.nn.functional.cross_entropy(x, t, reduction="sum")
    (0.5 * want).backward()
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-7)


def test_bf16_logits_go_through_the_fused_losses_in_float32():
    """bf16 logits (the LM head under autocast) are read in float32 block by block: the losses
    equal float32 losses of the same values, and the bf16 gradient is theirs rounded to bf16."""
    from nanotune.training.losses import cross_entropy_sum, token_logprobs

    torch.manual_seed(0)
    x = torch.randn(70, 500).bfloat16().requires_grad_()  # 70 rows: three blocks, one partial
    t = torch.randint(0, 500, (70,))
    w = torch.rand(70)
    for loss_fn, reduce in [(cross_entropy_sum, lambda y: 0.5 * y), (token_logprobs, w.dot)]:
        ours = loss_fn(x * 1.0, t)
        assert ours.dtype == torch.float32
        reduce(ours).backward()
        got, x.grad = x.grad, None
        xf = x.detach().float().requires_grad_()
        want = loss_fn(xf * 1.0, t)
        reduce(want).backward()
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, xf.grad.bfloat16(), rtol=0, atol=0)


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    from nanotune import hardware
    from nanotune.training.trainer import compute_precision

    cpu = torch.device("cpu")
    monkeypatch.delenv("NANOTUNE_NATIVE_BF16")
    cases = [({"avx512f"}, "float32"), ({"avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16")]
    for flags, want in cases:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert hardware.native_bf16(cpu) is (want == "bfloat16")
        precision, why = compute_precision(TrainConfig(), cpu)
        assert precision == want and "auto" in why
        assert compute_precision(TrainConfig(dtype="float32"), cpu)[0] == "float32"
    assert why == "train.dtype auto: this CPU has amx_bf16"
    monkeypatch.setenv("NANOTUNE_NATIVE_BF16", "0")
    assert compute_precision(TrainConfig(), cpu) == (
        "float32",
        "train.dtype auto: NANOTUNE_NATIVE_BF16=0",
    )
    assert compute_precision(TrainConfig(dtype="bfloat16"), cpu)[0] == "bfloat16"


@pytest.mark.slow
def test_bf16_autocast_trains_float32_masters_close_to_float32(tmp_path):
    """Mixed precision: bf16 products, float32 weights and optimizer state, the loss close to a
    float32 run's; the run's first metrics record says which precision it trained in."""
    batch = uneven_batch()
    losses, models = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(lr=3e-3, max_steps=30, micro_batch_size=4, grad_accum=2, dtype=dtype)
        models[dtype] = model = tiny()
        trainer = Trainer(model, cfg, lambda epoch: [batch], tmp_path / dtype, progress=False)
        losses[dtype] = trainer.fit().train_loss
        first = json.loads((tmp_path / dtype / "metrics.jsonl").read_text().splitlines()[0])
        assert first["precision"] == dtype
        assert all(p.dtype == torch.float32 for p in model.parameters())
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if v.ndim]
        assert state and all(v.dtype == torch.float32 for v in state)
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.05 * losses["float32"]
    # bf16 really ran: its weights differ from the float32 run's.
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            models["float32"].parameters(), models["bfloat16"].parameters(), strict=True
        )
    )

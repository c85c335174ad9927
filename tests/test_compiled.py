"""train.compile: compiled blocks equal eager ones, one graph serves every length, and auto
stays eager where a run is too short to win the compile back.

Each compile costs ~20 s of CPU here (inductor's C++ build), so the models are the smallest
(2 layers, n_embd 32) and the tests few; inductor's on-disk cache makes a repeated graph cheap.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from nanotune.methods import MethodConfig, apply_method
from nanotune.models import Transformer
from nanotune.training import TrainConfig, Trainer, lm_loss_sum
from nanotune.training import compiled as compiled_mod
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty compile caches, so its counts are its own (and the blocks'
    shared code object never reaches torch's recompile limit across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def model_for(family: str, method: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(family, vocab_size=V))
    cfg = MethodConfig(name=method, r=4, alpha=8, targets="all-linear")
    model = apply_method(model, cfg)
    if method == "lora":  # B starts at zero; make the adapters matter in the comparison
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model


def lm_batch(lengths: list[int], seed: int = 0) -> dict:
    """Right-padded rows of `lengths`, the first 2 tokens of each a prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    targets = torch.full((len(lengths), T), -100)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, V, (n,), generator=g)
        targets[r, 2 : n - 1] = ids[r, 3:n]
    return {"input_ids": ids, "targets": targets}


@pytest.mark.device
@pytest.mark.parametrize(
    ("family", "method"), [("gpt2", "full"), ("gpt2", "lora"), ("llama", "full"), ("llama", "lora")]
)
def test_compiled_step_equals_eager_step(family, method, on_device):
    """Loss and every trainable gradient of one forward+backward, float32: within 1e-5 relative
    for the loss and 1e-4 relative / 1e-6 absolute for gradients (inductor fuses and reorders
    float32 sums; measured ~1e-7). Two lengths, one graph."""
    eager = model_for(family, method).to(on_device)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    before = frames()
    for lengths in ([12, 7, 9, 3], [20, 17, 5]):
        batch = {k: v.to(on_device) for k, v in lm_batch(lengths).items()}
        losses = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            loss = lm_loss_sum(m, batch)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
        got = {n: p.grad for n, p in compiled.named_parameters() if p.requires_grad}
        want = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys() and all(g is not None for g in got.values())
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # It ran compiled, and both lengths took the same graphs: one for every block, or with
    # frozen embeddings (LoRA) two, the first block's input needing no gradient.
    graphs = 1 if method == "full" else 2
    assert frames() - before == graphs
    # No gradients, no compiled graph: evaluation stays eager (and compiles nothing).
    with torch.no_grad():
        torch.testing.assert_close(
            lm_loss_sum(compiled, batch), lm_loss_sum(eager, batch), rtol=0, atol=0
        )
    assert frames() - before == graphs


def varied_batches(epoch: int) -> list[dict]:
    """Lengths from 4 to 41 and a last batch of 3 rows: every step a new shape. (A micro-batch
    of one row among larger ones would add a graph: torch specialises sizes 0 and 1.)"""
    shapes = [[12, 7, 9, 3], [41, 17, 5, 30], [4, 4, 6, 5], [25, 33, 8, 19], [14, 9, 11]]
    return [lm_batch(lengths, seed=epoch * 10 + i) for i, lengths in enumerate(shapes)]


def _trainer(run, compile, model=None, device="cpu", **cfg) -> Trainer:
    config = TrainConfig(lr=1e-2, max_steps=6, micro_batch_size=4, compile=compile, device=device)
    for k, v in cfg.items():
        setattr(config, k, v)
    model = model or model_for("gpt2", "lora")
    return Trainer(model, config, varied_batches, run, progress=False)


@pytest.mark.device
def test_a_run_with_varied_lengths_never_recompiles_and_says_what_it_cost(
    tmp_path, capsys, on_device
):
    before = frames()
    trainer = _trainer(tmp_path, True, device=on_device.type)
    trainer.fit()
    assert frames() - before == 2, "recompiled for a length or batch size"  # LoRA: 2 graphs
    out = capsys.readouterr().out
    assert "train.compile true: the blocks run through torch.compile (inductor)" in out
    assert "compiled blocks: 2 graph(s) compiled in the run" in out
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    compile_s = [r["compile_s"] for r in records if "compile_s" in r]
    assert len(compile_s) == 1 and compile_s[0] > 0
    assert trainer.model._compiled_blocks is None  # handed back eager


def test_auto_is_eager_for_a_short_run_and_compiles_past_the_break_even(
    tmp_path, capsys, monkeypatch
):
    before = frames()
    _trainer(tmp_path / "short", "auto").fit()
    out = capsys.readouterr().out
    assert "train.compile auto: eager (~" in out and "break-even on cpu 600 s" in out
    assert frames() == before
    monkeypatch.setitem(compiled_mod.BREAK_EVEN_S, "cpu", 0.0)
    _trainer(tmp_path / "long", "auto").fit()
    out = capsys.readouterr().out
    assert "train.compile auto: compiled (~" in out
    assert frames() - before == 2  # LoRA: the first block and the rest


def test_auto_stays_eager_for_cpu_bf16_with_frozen_weights(tmp_path, capsys, monkeypatch):
    """Measured slower compiled (benchmarks/NOTES.md): CPU bf16 LoRA stays eager under auto,
    however long the run; full fine-tuning in bf16 is left to the break-even."""
    monkeypatch.setitem(compiled_mod.BREAK_EVEN_S, "cpu", 0.0)
    lora = compiled_mod.CompiledBlocks(model_for("gpt2", "lora"), "auto", CPU, "bfloat16")
    full = compiled_mod.CompiledBlocks(model_for("gpt2", "full"), "auto", CPU, "bfloat16")
    said = []
    lora.start(said.append)
    assert lora.decided and not lora.on
    assert said == [
        "train.compile auto: eager (bf16 on a CPU with frozen weights: compiled steps measured "
        "slower, the graph casts each frozen weight at every call)"
    ]
    full.start(said.append)
    assert not full.decided and len(said) == 1


def test_false_never_compiles(tmp_path, capsys):
    """compile: false stays eager however long the run looks (auto alone decides on timings)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(compiled_mod.BREAK_EVEN_S, "cpu", 0.0)
    before = frames()
    try:
        _trainer(tmp_path, False).fit()
    finally:
        monkeypatch.undo()
    assert frames() == before
    assert "train.compile" not in capsys.readouterr().out


def test_resume_is_bit_identical_within_compiled_mode(tmp_path):
    whole = _trainer(tmp_path / "whole", True, save_every=3, keep_last=5)
    whole.fit()
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for later in ("step-5", "step-6"):  # step 5 ends the first epoch
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / later)
    resumed = _trainer(tmp_path / "cut", True, save_every=3, keep_last=5)
    resumed.fit(resume=True)
    want = dict(whole.model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in resumed.model.named_parameters())


@pytest.mark.device
def test_compiled_bf16_step_close_to_eager_on_gpu(cuda_device):
    """bf16 autocast on a GPU (Triton kernels): the compiled step's loss within 1e-2 relative of
    the eager one's and every gradient pointing the same way (cosine > 0.99): bf16 rounds
    differently once ops are fused, so closeness, not equality."""
    for family in ("gpt2", "llama"):
        eager = model_for(family, "lora").to(cuda_device)
        compiled = copy.deepcopy(eager)
        compiled.compile_blocks()
        batch = {k: v.to(cuda_device) for k, v in lm_batch([20, 17, 5]).items()}
        losses, grads = [], []
        for m in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm_loss_sum(m, batch)
            loss.backward()
            losses.append(float(loss))
            grads.append(
                {n: p.grad.float().flatten() for n, p in m.named_parameters() if p.grad is not None}
            )
        assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])
        for n, g in grads[0].items():
            assert torch.nn.functional.cosine_similarity(g, grads[1][n], dim=0) > 0.99, n

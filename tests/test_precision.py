"""Compute precision per device: auto's choice (never emulated bf16), float16 autocast with a
loss scaler, and its state across a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nanotune.errors import NanotuneError
from nanotune.methods import MethodConfig, apply_method
from nanotune.models import Transformer
from nanotune.training import TrainConfig, Trainer
from nanotune.training.precision import (
    autocast_for,
    compute_precision,
    grad_scaler_for,
    needs_grad_scaler,
)
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96
CUDA = torch.device("cuda")


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int], native: bool) -> list:
    """torch.cuda's answers for a GPU that multiplies bf16 natively or only by emulation (torch
    reports bf16 as supported on a T4 unless asked to leave emulation out); the calls made."""
    calls = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return calls


@pytest.mark.parametrize(
    ("name", "capability", "native", "want"),
    [
        ("Tesla T4", (7, 5), False, "float16"),
        ("Tesla V100-SXM2-16GB", (7, 0), False, "float16"),
        ("NVIDIA A100-SXM4-80GB", (8, 0), True, "bfloat16"),
        ("NVIDIA H100 80GB HBM3", (9, 0), True, "bfloat16"),
    ],
)
def test_auto_never_picks_emulated_bf16_on_a_gpu(monkeypatch, name, capability, native, want):
    calls = _fake_gpu(monkeypatch, name, capability, native)
    precision, why = compute_precision(TrainConfig(), CUDA)
    assert precision == want
    assert calls and not any(calls), "asked torch with emulation counted as bf16"
    assert why.startswith(f"train.dtype auto: {name}, compute capability {capability[0]}.")
    assert ("no native bf16" in why) is (want == "float16")
    # What the trainer builds from it: a loss scaler exactly where float16 autocast runs.
    assert needs_grad_scaler(TrainConfig(), CUDA) is (want == "float16")
    # An explicit choice is taken as given, emulated or not.
    for dtype in ("float32", "bfloat16", "float16"):
        assert compute_precision(TrainConfig(dtype=dtype), CUDA) == (dtype, "train.dtype")


def test_cpu_auto_is_unchanged_and_float16_is_only_by_choice(monkeypatch):
    from nanotune import hardware

    cpu = torch.device("cpu")
    monkeypatch.delenv("NANOTUNE_NATIVE_BF16")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert compute_precision(TrainConfig(), cpu)[0] == "float32"  # never float16 on a CPU
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert compute_precision(TrainConfig(), cpu)[0] == "bfloat16"
    assert not grad_scaler_for(TrainConfig(), cpu, []).is_enabled()
    assert grad_scaler_for(TrainConfig(dtype="float16"), cpu, []).is_enabled()
    with autocast_for(TrainConfig(dtype="float16"), cpu)():
        assert torch.get_autocast_dtype("cpu") == torch.float16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    weight = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    with pytest.raises(NanotuneError, match=r"float32 master weights; .*model.dtype: float32"):
        grad_scaler_for(TrainConfig(dtype="float16"), cpu, [weight])


def demo_like(seed: int = 0) -> Transformer:
    """The demo's shape at toy size: the SmolLM2 (Llama) layout with LoRA r=16 on every linear."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config("llama", vocab_size=V))
    return apply_method(model, MethodConfig(name="lora", r=16, alpha=32, targets="all-linear"))


def lm_batches(n: int = 4, rows: int = 8, seed: int = 0) -> list[dict]:
    """Learnable right-padded rows (each token follows from the one before), varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(8, 40, (rows,), generator=g)
        T = int(lengths.max())
        ids = torch.zeros(rows, T, dtype=torch.long)
        targets = torch.full((rows, T), -100)
        for r, length in enumerate(lengths.tolist()):
            start = int(torch.randint(1, V, (1,), generator=g))
            ids[r, :length] = (start + 7 * torch.arange(length)) % (V - 1) + 1
            targets[r, : length - 1] = ids[r, 1:length]
        out.append({"input_ids": ids, "targets": targets})
    return out


def _run(tmp_path, dtype: str, device: str = "cpu", **cfg) -> tuple[Trainer, float]:
    batches = lm_batches()
    config = TrainConfig(
        lr=1e-2, max_steps=60, micro_batch_size=4, grad_accum=2, dtype=dtype, device=device
    )
    for k, v in cfg.items():
        setattr(config, k, v)
    trainer = Trainer(demo_like(), config, lambda epoch: batches, tmp_path / dtype, progress=False)
    return trainer, trainer.fit().train_loss


@pytest.mark.slow
@pytest.mark.device
def test_float16_with_grad_scaler_trains_within_3_percent_of_float32(tmp_path, capsys, on_device):
    """float16 autocast with a GradScaler, as a T4 trains (on CPU: torch's CPU float16
    autocast): its last loss within 3% of a float32 run's, float32 master weights, the scale in
    the metrics."""
    _, fp32 = _run(tmp_path, "float32", on_device.type)
    trainer, fp16 = _run(tmp_path, "float16", on_device.type)
    assert trainer.scaler.is_enabled()
    first_loss = json.loads((tmp_path / "float16" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_loss["precision"] == "float16" and first_loss["loss_scale"] == 2.0**16
    assert fp16 < 0.9 * first_loss["loss"]  # it learned (LoRA on a random model: slowly)
    assert abs(fp16 - fp32) <= 0.03 * fp32, (fp16, fp32)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    log = capsys.readouterr().out
    assert "compute precision: float16 (train.dtype), loss scaling by a GradScaler" in log


def test_overflowing_step_is_skipped_not_fatal(tmp_path):
    """A scale too large for float16 overflows the gradients: the scaler skips that step (the
    weights stay) and halves the scale; the run goes on instead of stopping on a non-finite
    gradient norm."""
    batches = lm_batches(n=1)
    cfg = TrainConfig(lr=1e-2, max_steps=3, micro_batch_size=8, dtype="float16")
    trainer = Trainer(demo_like(), cfg, lambda epoch: batches, tmp_path, progress=False)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in records if "loss_scale" in r]
    assert scales[:2] == [2.0**40, 2.0**39]
    assert not torch.isfinite(torch.tensor(records[0]["grad_norm"]))
    # Every step overflowed at these scales: no update reached the weights.
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_resume_restores_the_loss_scale_bit_identically(tmp_path):
    """The scaler's state (scale, growth tracker) is in every checkpoint: a run resumed from
    step 3 ends with the weights of an uninterrupted one, its scale grown as that one's."""
    batches = lm_batches()
    cfg = dict(lr=1e-2, max_steps=6, micro_batch_size=8, dtype="float16", save_every=3, keep_last=5)

    def trainer(run, model):
        config = TrainConfig(**cfg)
        t = Trainer(model, config, lambda epoch: batches, run, progress=False)
        # A scale that grows every 2 good steps, so a scaler not restored would differ.
        t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        return t

    whole = trainer(tmp_path / "whole", demo_like())
    whole.fit()
    state = torch.load(
        tmp_path / "whole" / "checkpoints" / "step-3" / "state.pt", weights_only=True
    )
    assert state["grad_scaler"]["scale"] > 2.0**8
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for later in ("step-4", "step-6"):  # step 4 ends the first epoch (4 batches)
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / later)
    resumed = trainer(tmp_path / "cut", demo_like())  # frozen base weights: the same
    resumed.fit(resume=True)
    assert resumed.scaler.get_scale() == whole.scaler.get_scale()
    want = dict(whole.model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in resumed.model.named_parameters())


@pytest.mark.device
def test_auto_on_this_gpu_trains_in_what_the_card_multiplies(tmp_path, cuda_device):
    """On a real GPU: auto is bf16 from compute capability 8.0 (Ampere) on, float16 with a
    scaler before it; either way the run ends within 3% of float32's loss."""
    native = torch.cuda.get_device_capability(cuda_device) >= (8, 0)
    precision, why = compute_precision(TrainConfig(), cuda_device)
    assert precision == ("bfloat16" if native else "float16"), why
    _, fp32 = _run(tmp_path, "float32", "cuda")
    trainer, auto = _run(tmp_path, "auto", "cuda")
    assert trainer.scaler.is_enabled() is (not native)
    assert abs(auto - fp32) <= 0.03 * fp32, (precision, auto, fp32)

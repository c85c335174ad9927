"""Fine-tuning methods on tiny random GPT-2 and Llama models: what trains, merge parity, NF4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from nanotune.errors import NanotuneError
from nanotune.methods import (
    LoRALinear,
    MethodConfig,
    SequenceClassifier,
    apply_method,
    lora_layers,
    merge,
    nf4,
    trainable_report,
)
from nanotune.models import ModelConfig, Transformer

GPT2 = tiny_config("gpt2", block_size=32, n_embd=64)
LLAMA = tiny_config("llama", block_size=32, n_embd=64, intermediate_size=128)


def make(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config)


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (4, 16), generator=g)


def lm_loss(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_steps(model, loss_fn, steps: int = 8, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: nf4.dequantize(p).detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    after = snapshot(model)
    return {n for n in after if n not in before or not torch.equal(before[n], after[n])}


def randomise_adapters(model, seed: int = 3) -> None:
    """B starts at zero, which would make every parity check trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ".lora_magnitude." in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "last_n", "lora", "dora", "qlora"])
@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_method_trains_exactly_its_parameters(name, config):
    model = make(config)
    cfg = MethodConfig(name=name, last_n=1, r=4, alpha=8, targets="all-linear")
    apply_method(model, cfg)
    ids = batch()
    before = snapshot(model)
    losses = train_steps(model, lambda: lm_loss(model, ids))
    assert losses[-1] < losses[0] - 0.05, losses
    moved = changed(before, model)
    if name == "full":
        expected = set(before)
    elif name == "last_n":
        expected = {n for n in before if n.startswith("blocks.1.") or n.startswith("norm.")}
    else:
        expected = {n for n in before if ".lora_" in n}
    assert moved == expected
    if name == "qlora":
        assert all(nf4.is_nf4(layer.weight) for layer in lora_layers(model).values())


def test_lora_targets_only_named_modules_and_zero_init_is_identity():
    model = make(GPT2)
    ids = batch()
    ref = model(ids)
    apply_method(
        model,
        MethodConfig(name="lora", r=2, alpha=4, targets=["c_attn.q", "c_attn.v", "mlp.c_proj"]),
    )
    layers = lora_layers(model)
    assert sorted(layers) == [
        "blocks.0.attn.qkv",
        "blocks.0.mlp.proj",
        "blocks.1.attn.qkv",
        "blocks.1.mlp.proj",
    ]
    qkv = layers["blocks.0.attn.qkv"]
    assert [(a.name, a.start, a.end) for a in qkv.adapters] == [("q", 0, 64), ("v", 128, 192)]
    assert qkv.lora_A.shape == (4, 64)  # both A's in one matmul
    assert torch.equal(model(ids), ref)  # B = 0: the model is unchanged until it trains


def test_all_linear_includes_gpt2_conv1d_layers_never_lm_head():
    model = make(GPT2)
    apply_method(model, MethodConfig(name="lora", targets="all-linear"))
    assert len(lora_layers(model)) == 4 * GPT2.n_layer
    assert not isinstance(model.lm_head, LoRALinear)
    llama = make(LLAMA)
    apply_method(llama, MethodConfig(name="lora", targets="all-linear"))
    names = [a.name for a in llama.blocks[0].attn.qkv.adapters] + [
        a.name for a in llama.blocks[0].mlp.fc.adapters
    ]
    assert sorted(names) == ["gate", "k", "q", "up", "v"]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(
    "config,targets",
    [
        (GPT2, ["c_attn", "c_proj", "c_fc"]),
        (GPT2, ["c_attn.q", "c_attn.v"]),
        (LLAMA, "all-linear"),
        (LLAMA, ["q_proj", "v_proj", "down_proj"]),
    ],
    ids=["gpt2-whole", "gpt2-qv", "llama-all", "llama-qv"],
)
def test_merged_equals_unmerged(config, targets, dora):
    model = make(config).eval()
    apply_method(
        model, MethodConfig(name="lora", r=4, alpha=8, targets=targets, dora=dora, rslora=dora)
    )
    randomise_adapters(model)
    ids = batch()
    with torch.no_grad():
        ref = model(ids)
        merged = merge(model)
        assert not lora_layers(merged)
        out = merged(ids)
    assert (out - ref).abs().max() < 1e-5


def test_qlora_nf4_memory_and_merge():
    model = make(GPT2)
    fp32_blocks = sum(
        p.numel() * 4
        for n, p in model.named_parameters()
        if n.startswith("blocks.") and p.dim() == 2
    )
    apply_method(model, MethodConfig(name="qlora", r=4, alpha=8, targets=["c_attn"]))
    held, fp32 = nf4.base_weight_bytes(model)
    assert fp32 == fp32_blocks
    assert 1 / 8.5 < held / fp32 < 1 / 5.5
    assert "NF4 base weights" in trainable_report(model)
    # Non-targeted block linears are NF4 too, with no adapters and no trainable weights.
    proj = model.blocks[0].mlp.proj
    assert isinstance(proj, LoRALinear) and nf4.is_nf4(proj.weight) and not proj.adapters
    randomise_adapters(model)
    ids = batch()
    with torch.no_grad():
        ref = model(ids)
        out = merge(model)(ids)
    assert (out - ref).abs().max() < 1e-5


QLORA_IN_A_FRESH_PROCESS = """
import sys
import nanotune, nanotune.cli, nanotune.jobs.demo, nanotune.jobs.finetune, nanotune.eval
import nanotune.training.trainer
import nanotune.data.pipeline, nanotune.weights.gguf
assert "torchao" not in sys.modules, "torchao was imported before any NF4 weight"
from tiny import tiny_config
from nanotune.methods import MethodConfig, apply_method, nf4
from nanotune.models import Transformer
model = apply_method(Transformer(tiny_config("gpt2", n_embd=64)), MethodConfig(name="qlora"))
assert nf4.is_nf4(model.blocks[0].attn.qkv.weight)
"""


@pytest.mark.slow
def test_torchao_is_imported_only_for_nf4_and_quietly():
    """torchao logs failed CUDA extension loads and a torch deprecation when imported; users of
    the other methods never import it, and a QLoRA user sees none of that."""
    import nanotune

    paths = [str(Path(nanotune.__file__).parents[1]), str(Path(__file__).parent)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    done = subprocess.run(
        [sys.executable, "-c", QLORA_IN_A_FRESH_PROCESS],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.slow
def test_classifier_pools_last_real_token_and_combines_with_lora():
    body = make(GPT2)
    clf = SequenceClassifier(body, 3, ["neg", "neu", "pos"])
    ids = batch()
    lengths = torch.tensor([16, 5, 9, 1])
    logits = clf(ids, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = clf(ids[b : b + 1, :n], torch.tensor([n]))  # the row with no padding at all
        assert (alone - logits[b]).abs().max() < 1e-5
    apply_method(clf, MethodConfig(name="lora", r=4, alpha=8, targets=["c_attn"]))
    labels = torch.tensor([0, 1, 2, 1])
    before = snapshot(clf)
    losses = train_steps(clf, lambda: F.cross_entropy(clf(ids, lengths), labels), lr=3e-2)
    assert losses[-1] < losses[0]
    assert changed(before, clf) == {"score.weight"} | {n for n in before if ".lora_" in n}


def test_full_counts_tied_embedding_once_and_report_format():
    model = make(GPT2)
    apply_method(model, MethodConfig(name="full"))
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    untied = total + model.lm_head.weight.numel()
    report = trainable_report(model)
    assert report == f"trainable {total:,} / {total:,} (100.00%)"
    assert str(untied) not in report.replace(",", "")


def test_train_embeddings_trains_wte_with_lora():
    model = make(GPT2)
    apply_method(model, MethodConfig(name="lora", targets=["c_attn"], train_embeddings=True))
    assert model.wte.weight.requires_grad and model.lm_head.weight.requires_grad
    assert not model.wpe.weight.requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "prefix"}, "method.name: 'prefix' is not one of"),
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"targets": []}, "targets"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(NanotuneError, match=match):
        MethodConfig(**kwargs)


def test_unknown_target_lists_valid_names():
    with pytest.raises(NanotuneError) as e:
        apply_method(make(GPT2), MethodConfig(name="lora", targets=["q_proj"]))
    msg = str(e.value)
    assert "'q_proj'" in msg and "c_attn" in msg and "c_attn.q" in msg and "mlp.c_proj" in msg
    with pytest.raises(NanotuneError, match="q_proj"):
        apply_method(make(LLAMA), MethodConfig(name="lora", targets=["c_attn"]))


def test_overlapping_targets_and_too_many_blocks():
    with pytest.raises(NanotuneError, match="overlap"):
        apply_method(make(GPT2), MethodConfig(name="lora", targets=["c_attn", "c_attn.q"]))
    with pytest.raises(NanotuneError, match="last_n"):
        apply_method(make(GPT2), MethodConfig(name="last_n", last_n=3))


@pytest.mark.slow
def test_dora_with_dropout_trains_and_dropout_is_off_in_eval():
    model = make(LLAMA)
    apply_method(
        model, MethodConfig(name="dora", r=4, alpha=8, dropout=0.3, targets=["q_proj", "v_proj"])
    )
    ids = batch()
    model.train()
    losses = train_steps(model, lambda: lm_loss(model, ids))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))  # dropout on the LoRA input
        model.eval()
        assert torch.equal(model(ids), model(ids))


def test_nf4_linear_matches_dense_on_dequantized_weight():
    from nanotune.methods import nf4

    torch.manual_seed(0)
    w = nf4.quantize_nf4(torch.randn(96, 64), 64, "test")
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad = torch.randn(3, 5, 96)
    nf4.linear(x, w, None).backward(grad)
    got, x.grad = x.grad, None
    dense = nf4.dequantize(w)
    out = torch.nn.functional.linear(x, dense)
    out.backward(grad)
    torch.testing.assert_close(nf4.linear(x, w, None), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)

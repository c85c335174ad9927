"""apply_method: choose what trains (full, last-N blocks, LoRA/DoRA, QLoRA) and report it."""

from __future__ import annotations

from torch import nn

from nanotune.errors import NanotuneError
from nanotune.methods import nf4
from nanotune.methods.classifier import SequenceClassifier
from nanotune.methods.config import MethodConfig
from nanotune.methods.lora import apply_lora


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Transform a Transformer or SequenceClassifier in place and set `requires_grad` so that
    exactly the method's parameters train. A classification head always trains."""
    body = model.body if isinstance(model, SequenceClassifier) else model
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.name == "qlora":
        dtype = nf4.resolve_dtype(cfg.compute_dtype, body.device)
        model.to(dtype)
    if cfg.uses_lora:
        apply_lora(
            body,
            cfg.targets,
            cfg.r,
            cfg.alpha,
            dropout=cfg.dropout,
            rslora=cfg.rslora,
            dora=cfg.dora,
            quantize_block=cfg.nf4_block if cfg.name == "qlora" else None,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.uses_lora:
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.requires_grad_(True)
    else:  # last_n
        n_layer = len(body.blocks)
        if cfg.last_n > n_layer:
            raise NanotuneError(
                f"method.last_n={cfg.last_n} exceeds the model's {n_layer} blocks; "
                f"use at most {n_layer}"
            )
        for block in body.blocks[n_layer - cfg.last_n :]:
            block.requires_grad_(True)
        body.norm.requires_grad_(True)
    if cfg.train_embeddings:
        body.wte.requires_grad_(True)
        body.lm_head.requires_grad_(True)
    if isinstance(model, SequenceClassifier):
        model.score.requires_grad_(True)
    return model


def trainable_report(model: nn.Module) -> str:
    """'trainable 294,912 / 124,734,720 (0.24%)' (tied weights counted once), plus NF4 bytes."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    line = f"trainable {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    held, fp32 = nf4.base_weight_bytes(model)
    if held:
        line += f"; NF4 base weights {held / 2**20:.1f} MiB (fp32 {fp32 / 2**20:.1f} MiB)"
    return line

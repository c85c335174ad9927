"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors), in and out.

PEFT keeps lora_A [r, in] and lora_B [out, r] in nn.Linear orientation even for GPT-2's Conv1D
(`fan_in_fan_out` only transposes the base weight), so A/B copy across unchanged. What PEFT cannot
name, separate pairs on slices of GPT-2's fused c_attn, is written exactly as one c_attn LoRA of
rank sum(r): A stacked, B block-structured with zeros, its alpha set by `alpha_pattern` so the
scale is kept.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.methods import nf4
from nanotune.methods.classifier import SequenceClassifier
from nanotune.methods.lora import Adapter, LoRALinear, lora_layers, module_rows, wrap_linear
from nanotune.models.config import ModelConfig
from nanotune.weights.convert import HF_BLOCK_PREFIX, HF_MODULES
from nanotune.weights.read import check_finite, read_json_object, read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_DEFAULT_R = 8  # LoraConfig's r when adapter_config.json has none
_KEY = re.compile(
    r"^(?:transformer\.h|model\.layers)\.(\d+)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)


def _hf_names(config: ModelConfig) -> dict[tuple[str, str | None], str]:
    return {v: k for k, v in HF_MODULES[config.family].items()}


def _body(model: nn.Module) -> nn.Module:
    return model.body if isinstance(model, SequenceClassifier) else model


def _export_layer(
    layer: LoRALinear, config: ModelConfig, module: str
) -> list[tuple[str, int, float, Tensor, Tensor, Tensor | None]]:
    """(hf module name, r, alpha, A, B, magnitude) for one LoRALinear, in PEFT's terms."""
    names = _hf_names(config)
    ads = layer.adapters
    direct = [names.get((module, None if a.name == "all" else a.name)) for a in ads]
    if all(direct):
        return [
            (
                n,
                a.r,
                a.alpha,
                layer.a_of(a),
                layer.lora_B[a.name],
                layer.lora_magnitude[a.name] if a.dora else None,
            )
            for n, a in zip(direct, ads, strict=True)
        ]
    # Slices PEFT cannot name: one exact whole-matrix LoRA of rank sum(r) with the first scale.
    hf = names[(module, None)]
    rank = sum(a.r for a in ads)
    scale = ads[0].scale
    alpha = scale * (math.sqrt(rank) if ads[0].rslora else rank)
    B = torch.zeros(layer.out_features, rank, dtype=layer.lora_dtype, device=layer.weight.device)
    A = torch.cat([layer.a_of(a) for a in ads])
    col = 0
    for a in ads:
        B[a.start : a.end, col : col + a.r] = layer.lora_B[a.name] * (a.scale / scale)
        col += a.r
    mag = None
    if ads[0].dora:
        # Rows without an adapter keep their own norm, so PEFT's m/|W| factor is 1 there.
        mag = torch.linalg.norm(nf4.dequantize(layer.weight).to(layer.lora_dtype), dim=1)
        for a in ads:
            mag[a.start : a.end] = layer.lora_magnitude[a.name]
    return [(hf, rank, alpha, A, B, mag)]


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str) -> Path:
    """Write the model's LoRA/DoRA adapters (and a classifier's `score`) as a PEFT folder that
    `peft.PeftModel.from_pretrained(transformers_model, directory)` loads."""
    body = _body(model)
    config: ModelConfig = body.config
    layers = {p: m for p, m in lora_layers(body).items() if m.adapters}
    if not layers:
        raise NanotuneError(
            "save_adapter: the model has no LoRA adapters; save the full model with save_model"
        )
    if body.wte.weight.requires_grad:
        raise NanotuneError(
            "save_adapter: the token embedding was trained (train_embeddings), which a LoRA adapter "
            "does not carry; merge the adapters and save the full model instead (nanotune merge)"
        )
    all_ads = [a for m in layers.values() for a in m.adapters]
    rslora, dora = all_ads[0].rslora, all_ads[0].dora
    if any(a.rslora != rslora or a.dora != dora for a in all_ads):
        raise NanotuneError(
            "save_adapter: adapters mix LoRA/DoRA or rsLoRA scalings; PEFT needs one kind per folder"
        )
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for path, layer in layers.items():
        _, i, module = path.split(".", 2)
        for hf, r, alpha, A, B, mag in _export_layer(layer, config, module):
            full = HF_BLOCK_PREFIX[config.family].format(i=i) + hf
            tensors[f"{PREFIX}{full}.lora_A.weight"] = A.detach().contiguous()
            tensors[f"{PREFIX}{full}.lora_B.weight"] = B.detach().contiguous()
            if mag is not None:
                tensors[f"{PREFIX}{full}.lora_magnitude_vector"] = mag.detach().contiguous()
            ranks[full] = (r, alpha)
    (r, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    seq_cls = isinstance(model, SequenceClassifier)
    if seq_cls:
        tensors[f"{PREFIX}score.weight"] = model.score.weight.detach().contiguous()
    dropout = next(
        (m.lora_dropout.p for m in layers.values() if isinstance(m.lora_dropout, nn.Dropout)), 0.0
    )
    cfg = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({k.split(".", 3)[3] for k in ranks}),
        "rank_pattern": {k: v[0] for k, v in ranks.items() if v[0] != r},
        "alpha_pattern": {k: v[1] for k, v in ranks.items() if v[1] != alpha},
        "fan_in_fan_out": config.family == "gpt2",  # GPT-2's Conv1D stores weights [in, out]
        "use_rslora": rslora,
        "use_dora": dora,
        "bias": "none",
        "modules_to_save": ["score"] if seq_cls else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written beside its final name and renamed: a reader never sees half a file.
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


ADAPTER_FIX = "re-save the adapter (nanotune train, or PEFT save_pretrained)"


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """adapter_config.json, with the fields nanotune reads checked for type."""
    path = Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise NanotuneError(
            f"{path}: no such file; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    cfg = read_json_object(path, "a PEFT adapter config", ADAPTER_FIX)
    if cfg.get("peft_type") != "LORA":
        raise NanotuneError(
            f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; nanotune loads LORA adapters"
        )

    def bad(key: str, want: str) -> NanotuneError:
        return NanotuneError(f"{path}: {key} must be {want}, got {cfg[key]!r}; {ADAPTER_FIX}")

    if "r" in cfg and not _is_int(cfg["r"], 1):
        raise bad("r", "a positive integer")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    for key, check, want in (
        ("rank_pattern", lambda v: _is_int(v, 1), "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        value = cfg.get(key)
        if value is not None and not (
            isinstance(value, dict) and all(check(v) for v in value.values())
        ):
            raise bad(key, f"a mapping of module names to {want}")
    for key in ("use_rslora", "use_dora"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    return cfg


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """adapter_model.safetensors with PEFT's `base_model.model.` prefix removed; NaN/inf refused."""
    path = Path(directory).expanduser() / WEIGHTS_FILE
    if not path.is_file():
        raise NanotuneError(f"{path}: no such file; nanotune reads adapters saved as safetensors")
    tensors = read_safetensors(path, "the adapter weights", ADAPTER_FIX)
    check_finite(tensors, path, ADAPTER_FIX)
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _pattern(patterns: dict, name: str, default):
    # PEFT's get_pattern_key: the first key matching a dotted suffix of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA/DoRA adapter (from peft or nanotune) onto a nanotune model in place."""
    cfg = read_adapter_config(directory)
    wpath = Path(directory).expanduser() / WEIGHTS_FILE
    tensors = read_adapter_tensors(directory)
    body = _body(model)
    config: ModelConfig = body.config
    modules = HF_MODULES[config.family]
    grouped: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key == "score.weight":
            continue
        m = _KEY.match(key)
        if not m or m.group(2) not in modules or int(m.group(1)) >= config.n_layer:
            raise NanotuneError(
                f"{wpath}: tensor {key!r} targets no linear of this {config.family} model with "
                f"{config.n_layer} blocks (adaptable: {', '.join(modules)}); is it the right base model?"
            )
        grouped.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3).split(".")[0]] = t
    if not grouped:
        raise NanotuneError(f"{wpath}: holds no lora_A/lora_B tensors")
    score = tensors.get("score.weight")
    if score is not None and (
        not isinstance(model, SequenceClassifier) or model.score.weight.shape != score.shape
    ):
        raise NanotuneError(
            f"{wpath}: holds a classification head of shape {tuple(score.shape)}; "
            "load it onto a SequenceClassifier with that many labels"
        )
    rslora, dora = bool(cfg.get("use_rslora")), bool(cfg.get("use_dora"))
    plan = []
    # Check every tensor before touching the model: a bad folder leaves it as it was.
    for (i, hf), parts in sorted(grouped.items()):
        full = HF_BLOCK_PREFIX[config.family].format(i=i) + hf
        if (
            "lora_A" not in parts
            or "lora_B" not in parts
            or (dora and "lora_magnitude_vector" not in parts)
        ):
            raise NanotuneError(
                f"{wpath}: {full} lacks lora_A, lora_B or (DoRA) lora_magnitude_vector"
            )
        A, B = parts["lora_A"], parts["lora_B"]
        module, part = modules[hf]
        path = f"blocks.{i}.{module}"
        base = body.get_submodule(path)
        rows = module_rows(config, module, part, base.out_features)
        r = A.shape[0] if A.dim() == 2 else -1  # -1: no rank, and the shapes below differ
        if A.shape != (r, base.in_features) or B.shape != (rows[1] - rows[0], r):
            raise NanotuneError(
                f"{wpath}: {full} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but this base "
                f"model needs [r, {base.in_features}] and [{rows[1] - rows[0]}, r]; it was made for another base model"
            )
        # The scale is alpha / r of the config: tensors of another rank would load with a
        # silently wrong scale (PEFT itself refuses such a folder).
        declared = _pattern(cfg.get("rank_pattern") or {}, full, cfg.get("r", PEFT_DEFAULT_R))
        if r != declared:
            raise NanotuneError(
                f"{wpath}: {full} has LoRA tensors of rank {r} but {CONFIG_FILE} declares r="
                f"{declared} for it; the two files do not belong together ({ADAPTER_FIX})"
            )
        mag = parts.get("lora_magnitude_vector")
        if mag is not None and tuple(mag.shape) != (rows[1] - rows[0],):
            raise NanotuneError(
                f"{wpath}: {full} has a DoRA magnitude of shape {tuple(mag.shape)}, but this base "
                f"model needs [{rows[1] - rows[0]}]; it was made for another base model"
            )
        alpha = _pattern(cfg.get("alpha_pattern") or {}, full, cfg.get("lora_alpha", 8))
        plan.append((path, part, rows, r, alpha, A, B, mag))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    for path, part, rows, r, alpha, A, B, mag in plan:
        layer = wrap_linear(body, path)
        adapter = layer.add_adapter(
            part or "all", rows, r, alpha, rslora=rslora, dora=dora, dropout=dropout
        )
        _fill(layer, adapter, A, B, mag)
    if score is not None:
        with torch.no_grad():
            model.score.weight.copy_(score)
    return model


def _fill(layer: LoRALinear, adapter: Adapter, A: Tensor, B: Tensor, mag: Tensor | None) -> None:
    with torch.no_grad():
        layer.a_of(adapter).copy_(A)
        layer.lora_B[adapter.name].copy_(B)
        if mag is not None:
            layer.lora_magnitude[adapter.name].copy_(mag)


def merge_adapter(
    base: str, adapter: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Load `base`, apply the PEFT adapter folder, fold it into the weights and write an HF folder
    (a classifier folder for SEQ_CLS adapters)."""
    from nanotune.methods.classifier import CLASSIFIER_FILE, save_classifier
    from nanotune.methods.lora import merge
    from nanotune.weights import load_model, save_model

    cfg = read_adapter_config(adapter)
    target = Path(out)
    # Refuse before the (slow) load; the savers check again and write atomically.
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise NanotuneError(f"{target} already exists; choose another folder or pass --overwrite")
    model, tokenizer = load_model(base)
    if cfg.get("task_type") != "SEQ_CLS":
        load_adapter(model, adapter)
        return save_model(merge(model), tokenizer, target, overwrite=overwrite)
    meta_path = Path(adapter).expanduser() / CLASSIFIER_FILE
    if meta_path.is_file():
        names = read_json_object(meta_path, "a nanotune classifier's labels", ADAPTER_FIX).get(
            "label_names"
        )
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise NanotuneError(
                f"{meta_path}: label_names must be a list of strings; {ADAPTER_FIX}"
            )
    else:  # a peft-made classifier: labels are only numbered
        score = read_adapter_tensors(adapter).get("score.weight")
        if score is None:
            raise NanotuneError(
                f"{adapter}: a SEQ_CLS adapter without {PREFIX}score.weight; save the head with it"
            )
        names = [str(i) for i in range(score.shape[0])]
    clf = load_adapter(SequenceClassifier(model, len(names), names), adapter)
    clf.body = merge(clf.body)
    return save_classifier(clf, target, tokenizer, overwrite=overwrite)

"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors), in and out.

PEFT keeps lora_A [r, in] and lora_B [out, r] in nn.Linear orientation even for GPT-2's Conv1D
(`fan_in_fan_out` only transposes the base weight), so A/B copy across unchanged. What PEFT cannot
name, separate pairs on slices of GPT-2's fused c_attn, is written exactly as one c_attn LoRA of
rank sum(r): A stacked, B block-structured with zeros, its alpha set by `alpha_pattern` so the
scale is kept. Phi-3's and GPT-NeoX's fused modules (`qkv_proj`, `gate_up_proj`,
`query_key_value`) are whole nanotune linears, so their pairs copy across as GPT-2's `c_attn`
does; GPT-NeoX's per-head qkv row order applies to B's rows and DoRA's magnitude
(`names.hf_row_order`), which keeps the product exact.

A run that trained the token embedding (`train_embeddings`, e.g. for added chat markers) keeps
it in the adapter as PEFT's `modules_to_save`: the whole embedding and, for a language model,
the LM head (PEFT ties a tied head back to the embedding only when both are listed and saved).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write
from nanotune.files.read import check_finite, read_json_object, read_safetensors
from nanotune.methods import nf4
from nanotune.methods.classifier import SequenceClassifier
from nanotune.methods.lora import Adapter, LoRALinear, lora_layers, module_rows, wrap_linear
from nanotune.models.config import ModelConfig
from nanotune.models.names import HF_BLOCK_PREFIX, HF_MODULES, hf_row_order
from nanotune.tokenizer import Tokenizer
from nanotune.weights.resolve import hub_id_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The full-weight modules an adapter may carry, under their Hugging Face names.
EMBEDDING = {family: "model.embed_tokens" for family in HF_MODULES} | {
    "gpt2": "transformer.wte",
    "gpt_neox": "gpt_neox.embed_in",
}
HEAD = "lm_head"
PEFT_DEFAULT_R = 8  # LoraConfig's r when adapter_config.json has none
_KEY = re.compile(
    r"^(?:transformer\.h|model\.layers|gpt_neox\.layers)\.(\d+)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)


def _hf_names(config: ModelConfig) -> dict[tuple[str, str | None], str]:
    return {v: k for k, v in HF_MODULES[config.family].items()}


def _body(model: nn.Module) -> nn.Module:
    return model.body if isinstance(model, SequenceClassifier) else model


def _export_layer(
    layer: LoRALinear, config: ModelConfig, module: str
) -> list[tuple[str, int, float, Tensor, Tensor, Tensor | None]]:
    """(hf module name, r, alpha, A, B, magnitude) for one LoRALinear, in PEFT's terms (B's rows
    and the magnitude in the checkpoint's row order)."""
    order = hf_row_order(config, module)
    pairs = _export_pairs(layer, config, module)
    if order is None:
        return pairs
    return [
        (n, r, alpha, A, B[order.to(B.device)], None if m is None else m[order.to(m.device)])
        for n, r, alpha, A, B, m in pairs
    ]


def _export_pairs(
    layer: LoRALinear, config: ModelConfig, module: str
) -> list[tuple[str, int, float, Tensor, Tensor, Tensor | None]]:
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
    `peft.PeftModel.from_pretrained(transformers_model, directory)` loads, and
    `AutoPeftModelForCausalLM.from_pretrained(directory)` too: the base is named by its hub id
    (or absolute path), never by a nanotune preset name (`weights.resolve.hub_id_of`)."""
    body = _body(model)
    config: ModelConfig = body.config
    layers = {p: m for p, m in lora_layers(body).items() if m.adapters}
    if not layers:
        raise NanotuneError(
            "save_adapter: the model has no LoRA adapters; save the full model with save_model"
        )
    all_ads = [a for m in layers.values() for a in m.adapters]
    rslora, dora = all_ads[0].rslora, all_ads[0].dora
    if any(a.rslora != rslora or a.dora != dora for a in all_ads):
        raise NanotuneError(
            "save_adapter: adapters mix LoRA/DoRA or rsLoRA scalings; PEFT needs one kind per "
            "folder"
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
    to_save = []
    if seq_cls:
        tensors[f"{PREFIX}score.weight"] = model.score.weight.detach().contiguous()
        to_save.append("score")
    embeddings = body.wte.weight.requires_grad  # trained: train_embeddings
    if embeddings:
        tensors[f"{PREFIX}{EMBEDDING[config.family]}.weight"] = (
            body.wte.weight.detach().contiguous()
        )
        to_save.append(EMBEDDING[config.family].rsplit(".", 1)[1])
        if not seq_cls:  # a classifier never uses the LM head
            # A copy even when tied: safetensors refuses two names for one storage.
            tensors[f"{PREFIX}{HEAD}.weight"] = body.lm_head.weight.detach().clone()
            to_save.append(HEAD)
    dropout = next(
        (m.lora_dropout.p for m in layers.values() if isinstance(m.lora_dropout, nn.Dropout)), 0.0
    )
    cfg = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
        "base_model_name_or_path": hub_id_of(base_model),
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
        "modules_to_save": to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if embeddings and not seq_cls and config.tie_embeddings:
        cfg["ensure_weight_tying"] = True  # PEFT keeps its head copy tied to the embedding
    out = Path(directory)
    # A reader never sees half a file (and final/ as a whole is swapped in by jobs/artifacts).
    weights = safetensors_bytes({k: v.cpu() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(out / WEIGHTS_FILE, weights)
    atomic_write(out / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
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
            f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; nanotune loads LORA "
            "adapters"
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


def adapter_tokenizer(directory: str | os.PathLike, fallback: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer saved beside an adapter (it holds the tokens the run added and its chat
    template), else `fallback` (the base model's)."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
        return Tokenizer.from_dir(d)
    return fallback


@dataclass
class _Pair:
    """One checked LoRA pair of an adapter folder, at the nanotune linear `path`."""

    path: str
    part: str | None
    rows: tuple[int, int]
    r: int
    alpha: float
    A: Tensor
    B: Tensor
    mag: Tensor | None


@dataclass
class _Plan:
    """Everything an adapter folder would change, checked before anything is changed."""

    pairs: list[_Pair]
    rslora: bool
    dora: bool
    dropout: float
    vocab: int
    score: Tensor | None
    embedding: Tensor | None
    head: Tensor | None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA/DoRA adapter (from peft or nanotune) onto a nanotune model in place.

    The vocabulary grows first to the adapter's embedding, or to its tokenizer when it saved no
    embedding (added tokens that did not train start where training started them: at the mean).
    """
    plan = _plan(model, directory)
    body = _body(model)
    for pair in plan.pairs:
        layer = wrap_linear(body, pair.path)
        adapter = layer.add_adapter(
            pair.part or "all",
            pair.rows,
            pair.r,
            pair.alpha,
            rslora=plan.rslora,
            dora=plan.dora,
            dropout=plan.dropout,
        )
        _fill(layer, adapter, pair.A, pair.B, pair.mag)
    if plan.vocab > body.config.vocab_size:
        body.resize_token_embeddings(plan.vocab)
    with torch.no_grad():
        if plan.score is not None:
            model.score.weight.copy_(plan.score)
        if plan.embedding is not None:
            body.wte.weight.copy_(plan.embedding)
        if plan.head is not None and not body.config.tie_embeddings:
            body.lm_head.weight.copy_(plan.head)
    return model


def adapter_pairs(
    body: nn.Module, directory: str | os.PathLike
) -> dict[str, tuple[Tensor, Tensor]]:
    """A LoRA adapter folder as one (A [r, in], scale * B [out, r]) pair per adapted linear of
    `body` (a plain Transformer, left untouched), for serving many adapters over one base.

    `x @ A.T @ B.T` is exactly the delta `LoRALinear` adds (slices of a fused linear become one
    block-structured B). Adapters that change more than the block linears are refused: DoRA
    rescales the base output, and trained embeddings or added tokens change the vocabulary.
    """
    plan = _plain_plan(
        body,
        directory,
        "which cannot share a batch with other adapters",
        "merge it (nanotune merge) and serve the merged folder as the model",
    )
    layers: dict[str, LoRALinear] = {}
    for pair in plan.pairs:
        if pair.path not in layers:  # a throwaway wrapper: it shares the base weight, no copy
            layers[pair.path] = LoRALinear(body.get_submodule(pair.path), where=pair.path)
        layer = layers[pair.path]
        adapter = layer.add_adapter(
            pair.part or "all", pair.rows, pair.r, pair.alpha, rslora=plan.rslora
        )
        _fill(layer, adapter, pair.A, pair.B, None)
    with torch.no_grad():
        return {
            p: (layer.lora_A.detach(), layer.scaled_b().detach()) for p, layer in layers.items()
        }


def hf_lora_pairs(
    body: nn.Module, directory: str | os.PathLike, fix: str
) -> list[tuple[str, Tensor, Tensor, float]]:
    """A LoRA adapter folder as PEFT names it: (Hugging Face module name, e.g.
    `model.layers.0.self_attn.q_proj`, A [r, in], B [out, r] with its rows in the checkpoint's
    order (GPT-NeoX's per-head qkv interleaving), scale) per pair, checked against
    `body` (a plain Transformer, left untouched). The delta of the module's weight is
    `scale * B @ A`. DoRA and trained embeddings or added tokens are refused; `fix` says what to
    do instead."""
    plan = _plain_plan(body, directory, "which only a merged model can carry", fix)
    config: ModelConfig = body.config
    names = _hf_names(config)
    out = []
    for pair in plan.pairs:
        i, module = pair.path.removeprefix("blocks.").split(".", 1)
        name = HF_BLOCK_PREFIX[config.family].format(i=i) + names[(module, pair.part)]
        scale = pair.alpha / (math.sqrt(pair.r) if plan.rslora else pair.r)
        order = hf_row_order(config, module)
        out.append((name, pair.A, pair.B if order is None else pair.B[order], scale))
    return out


def _plain_plan(body: nn.Module, directory: str | os.PathLike, why: str, fix: str) -> _Plan:
    """The plan of an adapter that changes the block linears only (no DoRA, no embeddings)."""
    plan = _plan(body, directory)
    where = Path(directory).expanduser()
    if plan.dora:
        raise NanotuneError(f"{where}: is a DoRA adapter, {why}; {fix}")
    if (
        plan.score is not None
        or plan.embedding is not None
        or plan.head is not None
        or (plan.vocab != body.config.vocab_size)
    ):
        raise NanotuneError(
            f"{where}: trains the embedding or adds tokens ({plan.vocab} tokens, the base has "
            f"{body.config.vocab_size}), {why}; {fix}"
        )
    return plan


def _plan(model: nn.Module, directory: str | os.PathLike) -> _Plan:
    """Read and check an adapter folder against `model`; raises before anything changes."""
    cfg = read_adapter_config(directory)
    wpath = Path(directory).expanduser() / WEIGHTS_FILE
    tensors = read_adapter_tensors(directory)
    body = _body(model)
    config: ModelConfig = body.config
    modules = HF_MODULES[config.family]
    emb_key, head_key = f"{EMBEDDING[config.family]}.weight", f"{HEAD}.weight"
    grouped: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key in ("score.weight", emb_key, head_key):
            continue
        m = _KEY.match(key)
        if not m or m.group(2) not in modules or int(m.group(1)) >= config.n_layer:
            raise NanotuneError(
                f"{wpath}: tensor {key!r} targets no linear of this {config.family} model with "
                f"{config.n_layer} blocks (adaptable: {', '.join(modules)}); is it the right base "
                "model?"
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
    vocab = _adapter_vocab(body, directory, wpath, tensors.get(emb_key), tensors.get(head_key))
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
                f"{wpath}: {full} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but "
                f"this base model needs [r, {base.in_features}] and [{rows[1] - rows[0]}, r]; "
                "it was made for another base model"
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
        order = hf_row_order(config, module)
        if order is not None:  # the checkpoint's row order to nanotune's
            B = B[order.argsort()]
            mag = None if mag is None else mag[order.argsort()]
        plan.append(_Pair(path, part, rows, r, alpha, A, B, mag))
    return _Plan(
        pairs=plan,
        rslora=rslora,
        dora=dora,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        vocab=vocab,
        score=score,
        embedding=tensors.get(emb_key),
        head=tensors.get(head_key),
    )


def _adapter_vocab(
    body: nn.Module,
    directory: str | os.PathLike,
    wpath: Path,
    emb: Tensor | None,
    head: Tensor | None,
) -> int:
    """The vocabulary size the model needs for this adapter, its embedding and head checked."""
    config: ModelConfig = body.config
    for key, t in ((EMBEDDING[config.family], emb), (HEAD, head)):
        if t is not None and (
            t.ndim != 2 or t.shape[1] != config.n_embd or t.shape[0] < config.vocab_size
        ):
            raise NanotuneError(
                f"{wpath}: {key}.weight has shape {tuple(t.shape)}, but this base model needs "
                f"[>= {config.vocab_size}, {config.n_embd}]; it was made for another base model"
            )
    if emb is not None and head is not None and emb.shape != head.shape:
        raise NanotuneError(
            f"{wpath}: its embedding {tuple(emb.shape)} and lm_head {tuple(head.shape)} differ in "
            "vocabulary; re-save the adapter"
        )
    if config.tie_embeddings and head is not None and (emb is None or not torch.equal(emb, head)):
        raise NanotuneError(
            f"{wpath}: its lm_head was trained apart from the embedding, but this model ties the "
            "two; train with the embedding in modules_to_save and ensure_weight_tying"
        )
    tokenizer = adapter_tokenizer(directory, None)
    saved = emb if emb is not None else head
    if saved is not None and tokenizer is not None and saved.shape[0] < tokenizer.vocab_size:
        raise NanotuneError(
            f"{wpath}: its embedding has {saved.shape[0]} rows but the tokenizer beside it has "
            f"{tokenizer.vocab_size} tokens; re-save the adapter with its own tokenizer"
        )
    rows = saved.shape[0] if saved is not None else 0
    return max(config.vocab_size, rows, tokenizer.vocab_size if tokenizer is not None else 0)


def _fill(layer: LoRALinear, adapter: Adapter, A: Tensor, B: Tensor, mag: Tensor | None) -> None:
    with torch.no_grad():
        layer.a_of(adapter).copy_(A)
        layer.lora_B[adapter.name].copy_(B)
        if mag is not None:
            layer.lora_magnitude[adapter.name].copy_(mag)

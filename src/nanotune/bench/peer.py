"""The peer: transformers + peft, set up as a competent user would.

Dynamic padding to the longest row, labels -100 on prompt and padding, the default attention
(sdpa), `model.train()`, torch AdamW over the trainable parameters: what `Trainer` does per step,
without its bookkeeping.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from nanotune.bench.cases import Case, model_config, sizes
from nanotune.bench.workload import LR, NotApplicable, Workload
from nanotune.weights.convert import config_to_hf

IGNORE = -100


def import_libraries(case: Case) -> None:
    """Import the stack before the memory baseline, so libraries are not counted as the case's."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if case.method == "qlora":
        import torchao  # noqa: F401


def _hf_config(case: Case, quick: bool, **extra: Any):
    from transformers import AutoConfig

    hf = config_to_hf(model_config(case, quick))
    return AutoConfig.for_model(hf.pop("model_type"), **{**hf, **extra})


def _lm_model(case: Case, quick: bool, source: str | None):
    from transformers import AutoModelForCausalLM

    if case.model == "smollm2":
        path = Path(source)
        if path.suffix == ".gguf":
            return AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return AutoModelForCausalLM.from_config(_hf_config(case, quick))


def _qlora_model(case: Case, quick: bool, device: str):
    """GPT-2 with 4-bit NF4 base weights, the way a user would ask transformers for it."""
    from transformers import AutoModelForCausalLM

    if device == "cuda":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise NotApplicable("bitsandbytes is not installed") from e
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
        from transformers import TorchAoConfig

        quant = TorchAoConfig(NF4WeightOnlyConfig())
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(_hf_config(case, quick)).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, device_map=device
        )
    weight = model.transformer.h[0].attn.c_attn.weight
    if device != "cuda" and type(weight).__name__ != "NF4Tensor":
        raise NotApplicable(
            "n/a on CPU: bitsandbytes 4-bit is CUDA-only, and transformers' "
            "TorchAoConfig(NF4WeightOnlyConfig) quantizes nn.Linear only, leaving GPT-2's Conv1D "
            f"c_attn as {type(weight).__name__} float32 (checked in this run)"
        )
    return model


def _lora(model, case: Case):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if case.targets == ("all-linear",) else list(case.targets)
    config = LoraConfig(
        r=case.r,
        lora_alpha=2 * case.r,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=case.model == "gpt2",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows])


def _sft_batch(item, pad: int) -> dict[str, torch.Tensor]:
    ids = [p + a for p, a in item]
    labels = [[IGNORE] * len(p) + a for p, a in item]
    return {
        "input_ids": _pad(ids, pad),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "labels": _pad(labels, IGNORE),
    }


def build(case: Case, quick: bool, device: str, items: list[Any], source: str | None) -> Workload:
    cfg = model_config(case, quick)
    pad = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    if case.kind == "generate":
        model = _lm_model(case, quick, source).to(device).eval()
        new = sizes(quick).gen_new

        def run(item: Any) -> None:
            ids = torch.tensor(item, device=device)
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad,
            )

        return Workload(run, items)

    if case.kind == "classify":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_config(
            _hf_config(case, quick, num_labels=2, pad_token_id=pad)
        )
        last = f"transformer.h.{cfg.n_layer - 1}."
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith((last, "transformer.ln_f.", "score."))
        batches = [
            {
                "input_ids": _pad([ids for ids, _ in item], pad),
                "attention_mask": _pad([[1] * len(ids) for ids, _ in item], 0),
                "labels": torch.tensor([y for _, y in item]),
            }
            for item in items
        ]
    else:
        if case.method == "qlora":
            model = _lora(_qlora_model(case, quick, device), case)
        else:
            model = _lm_model(case, quick, source)
            if case.method == "lora":
                model = _lora(model, case)
        if case.kind == "sft":
            batches = [_sft_batch(item, pad) for item in items]
        else:
            batches = [
                {"input_ids": torch.tensor(item), "labels": torch.tensor(item)} for item in items
            ]
    model.to(device).train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    # transformers' Trainer defaults on torch >= 2.8: fused AdamW, gradients clipped to norm 1.
    try:
        opt = torch.optim.AdamW(params, lr=LR, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=LR)

    def step(batch: dict[str, torch.Tensor]) -> None:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Workload(step, batches)

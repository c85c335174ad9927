"""The peer: transformers + peft (and TRL's `DPOTrainer` for DPO), set up as a competent user
would.

Dynamic padding to the longest row, labels -100 on prompt and padding, the default attention
(sdpa), `model.train()`, torch AdamW over the trainable parameters: what `Trainer` does per step,
without its bookkeeping. DPO runs TRL's own trainer, collator and optimizer (`_dpo`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from nanotune.bench.cases import Case, batch_size, model_config, sizes
from nanotune.bench.workload import BETA, LR, NotApplicable, Workload, in_precision
from nanotune.weights.convert import config_to_hf

IGNORE = -100


def import_libraries(case: Case) -> None:
    """Import the stack before the memory baseline, so libraries are not counted as the case's."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if case.kind in ("dpo", "grpo"):
        import datasets  # noqa: F401
        import trl  # noqa: F401

    if case.method == "qlora":
        import torchao  # noqa: F401


def _hf_config(case: Case, quick: bool, **extra: Any):
    from transformers import AutoConfig

    hf = config_to_hf(model_config(case, quick))
    return AutoConfig.for_model(hf.pop("model_type"), **{**hf, **extra})


def _trl_quiet(precision: str, device: str) -> dict[str, Any]:
    """What every TRL trainer of the bench is given alike: its precision flag, no gradient
    checkpointing (nanotune recomputes nothing either), no eval, logging or saving, a fixed seed."""
    return dict(
        bf16=precision == "bfloat16",
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        eval_strategy="no",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


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


def _lora_config(case: Case):
    from peft import LoraConfig

    targets = "all-linear" if case.targets == ("all-linear",) else list(case.targets)
    return LoraConfig(
        r=case.r,
        lora_alpha=2 * case.r,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=case.model == "gpt2",
        task_type="CAUSAL_LM",
    )


def _lora(model, case: Case):
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(case))


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


def _tokenizer(source: str):
    from transformers import AutoTokenizer

    path = Path(source)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def _dpo(
    case: Case, quick: bool, device: str, items: list[Any], source: str | None, precision: str
) -> Workload:
    """TRL's `DPOTrainer` as its documentation sets up LoRA DPO: a `peft_config`, so the
    reference is the model with adapters disabled (no second model), reference log-probs on the
    fly (`precompute_ref_log_probs=False`, as on our side). The bench's precision (`bf16`), no
    gradient checkpointing (TRL defaults to it; nanotune recomputes nothing either), no eval,
    logging or saving. A step is the trainer's own `training_step` (its collator's batch, its
    `compute_loss`: the concatenated chosen+rejected forward with its fused LM head, the
    adapters-off reference forward, the sigmoid loss and its metrics, backward), then what its
    loop does next: clip to norm 1, the optimizer it creates (fused AdamW), zero the gradients.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = _lm_model(case, quick, source)
    tokenizer = _tokenizer(source)
    # Trainer makes its output_dir at start-up; nothing is written there afterwards.
    with tempfile.TemporaryDirectory(prefix="nanotune-bench-trl-") as tmp:
        args = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch_size(case, quick),
            learning_rate=LR,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=None,  # no truncation, as on our side (the rows are far shorter anyway)
            precompute_ref_log_probs=False,
            **_trl_quiet(precision, device),
        )
        # DPOTrainer wants a text dataset to tokenize at start-up; the timed batches are the pairs'
        # token ids through the trainer's own collator, exactly what its dataloader yields from a
        # tokenized dataset (prompt_ids / chosen_ids / rejected_ids), in our order.
        placeholder = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
        trainer = DPOTrainer(
            model,
            args=args,
            train_dataset=placeholder,
            processing_class=tokenizer,
            peft_config=_lora_config(case),
        )
    batches = [
        trainer.data_collator(
            [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in item]
        )
        for item in items
    ]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop
    opt = trainer.create_optimizer()

    def step(batch: dict[str, torch.Tensor]) -> None:
        trainer.training_step(trainer.model, batch)
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        opt.step()
        trainer.model.zero_grad(set_to_none=True)

    return Workload(step, batches)


def _grpo(
    case: Case, quick: bool, device: str, items: list[Any], source: str | None, precision: str
) -> Workload:
    """TRL's `GRPOTrainer` as its documentation sets up LoRA GRPO on one machine without vLLM:
    a `peft_config`, transformers generation, beta 0 (its default: no reference model), loss
    dapo (its default), one generation per optimizer step, the side's precision (`bf16`), no
    gradient checkpointing, no eval, logging or saving. Completions are exactly `grpo_new`
    tokens (`generation_kwargs={"min_new_tokens": ...}`, as our side samples with no stop
    token). A step is its own `training_step` on the G copies of each prompt its sampler would
    yield (it generates, scores, computes advantages and the loss, backward), then clipping, the
    optimizer it creates and zeroed gradients. Its prompts are our token ids decoded to text."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from nanotune.bench.cases import GRPO_G, grpo_new

    model = _lm_model(case, quick, source)
    tokenizer = _tokenizer(source)
    new = grpo_new(quick)

    def length(completions: list[str], **_: Any) -> list[float]:
        return [float(len(c)) for c in completions]

    with tempfile.TemporaryDirectory(prefix="nanotune-bench-trl-") as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch_size(case, quick) * GRPO_G,
            num_generations=GRPO_G,
            max_completion_length=new,
            generation_kwargs={"min_new_tokens": new},
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",
            learning_rate=LR,
            weight_decay=0.0,
            max_grad_norm=1.0,
            **_trl_quiet(precision, device),
        )
        placeholder = Dataset.from_list([{"prompt": "a"}])
        trainer = GRPOTrainer(
            model,
            reward_funcs=[length],
            args=args,
            train_dataset=placeholder,
            processing_class=tokenizer,
            peft_config=_lora_config(case),
        )
    rows = [
        [{"prompt": tokenizer.decode(p)} for p in item for _ in range(GRPO_G)] for item in items
    ]
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop
    opt = trainer.create_optimizer()

    def step(batch: list[dict[str, str]]) -> None:
        trainer.training_step(trainer.model, batch, None)
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        opt.step()
        trainer.model.zero_grad(set_to_none=True)

    return Workload(step, rows)


def build(
    case: Case,
    quick: bool,
    device: str,
    items: list[Any],
    source: str | None,
    precision: str,
    compiled: bool = False,
) -> Workload:
    """The case's step; for bfloat16 under `torch.autocast` (TRL's own `bf16=True` for dpo);
    `compiled`: the model through `torch.compile` as `TrainingArguments(torch_compile=True)`
    wraps it (inductor, default mode, the whole model's forward, so its backward too)."""
    cfg = model_config(case, quick)
    pad = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    if case.kind == "dpo":
        return _dpo(case, quick, device, items, source, precision)
    if case.kind == "grpo":
        return _grpo(case, quick, device, items, source, precision)
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

        return Workload(in_precision(run, device, precision), items)

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
    if compiled:
        model = torch.compile(model)
    # transformers' Trainer defaults on torch >= 2.8: fused AdamW, gradients clipped to norm 1.
    try:
        opt = torch.optim.AdamW(params, lr=LR, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=LR)

    autocast = in_precision(lambda batch: model(**batch).loss, device, precision)

    def step(batch: dict[str, torch.Tensor]) -> None:
        autocast(batch).backward()  # Trainer's: the forward under autocast, backward after
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Workload(step, batches)

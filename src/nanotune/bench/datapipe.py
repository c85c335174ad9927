"""The data-100k case: from a JSONL file of completion rows to the first optimizer step.

Both sides get the same file (100,000 rows of a ~60-word prompt and a ~80-word completion,
about 141 GPT-2 tokens a row; --quick: 2,000), the same GPT-2 BPE, and the same small LoRA model,
built before the clock and the memory baseline start, so the figures are the data pipeline's:
reading, tokenizing with labels on the completion only (EOS included), batching 8 rows, one
LoRA step on them. nanotune: `build_datasets` (its data cache in a fresh folder, so the first
build tokenizes and writes it), `epoch_batches`, batch 0. The peer, as tutorials write it:
`datasets.load_dataset("json")`, `.map(tokenize, batched=True)` (its cache also fresh),
a shuffling `DataLoader` with `DataCollatorForSeq2Seq` (labels padded with -100), first batch.
nanotune also builds the same data a second time and reports how long reading the cache took.
"""

from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanotune.bench.cases import QUICK_GPT2
from nanotune.bench.workload import LR, peak_since, reset_peak, rss

WORDS = (
    "the a of quick brown fox jumps over lazy dog model data train token tune small large fast "
    "slow cat sat mat river bank money time light dark north south east west red green blue"
).split()
BATCH = 8


def rows(quick: bool) -> int:
    return 2_000 if quick else 100_000


def write_rows(path: Path, n: int) -> Path:
    rng = random.Random("nanotune-data-100k")
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(60))
            completion = " " + " ".join(rng.choice(WORDS) for _ in range(80))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def _span() -> Callable[[], int]:
    """Start the memory span (the worker's RSS high-water mark, as every case measures it);
    returns how to read its growth."""
    gc.collect()
    baseline = rss("VmRSS") or 0
    how = reset_peak("cpu")
    return lambda: peak_since("cpu", how, baseline)


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ours(path: Path, tmp: Path) -> tuple[float, int, float]:
    """(seconds to the first step, its RSS growth, seconds to batch 0 again from the cache)."""
    from nanotune.data import DataConfig, build_datasets
    from nanotune.data.batching import epoch_batches
    from nanotune.methods import MethodConfig, apply_method
    from nanotune.models import Transformer
    from nanotune.tokenizer import gpt2_tokenizer
    from nanotune.training.losses import LMObjective

    os.environ["NANOTUNE_DATA_CACHE"] = str(tmp / "nanotune-cache")
    cfg = DataConfig(source=str(path), format="completion", val_fraction=0.0)
    model = apply_method(Transformer(QUICK_GPT2), MethodConfig(name="lora", r=16, alpha=32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    objective = LMObjective()
    peak = _span()
    t0 = time.perf_counter()
    tokenizer = gpt2_tokenizer()
    data = build_datasets(cfg, tokenizer)
    batch = epoch_batches(data.train, BATCH, 0, 0, pad_id=tokenizer.pad_id)[0]
    _step(objective.loss_sum(model, batch) / objective.count(batch), opt)
    first, grown = time.perf_counter() - t0, peak()
    t1 = time.perf_counter()
    again = build_datasets(cfg, gpt2_tokenizer())
    epoch_batches(again.train, BATCH, 0, 0, pad_id=tokenizer.pad_id)[0]
    if again.cached is None:
        raise RuntimeError("the second build did not read the data cache")
    return first, grown, time.perf_counter() - t1


def _peer(path: Path, tmp: Path) -> tuple[float, int]:
    """(seconds to the first step, its RSS growth)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        GPT2TokenizerFast,
    )

    from nanotune.tokenizer.core import gpt2_files
    from nanotune.weights.convert import config_to_hf

    hf = config_to_hf(QUICK_GPT2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    encoder, merges = gpt2_files()
    datasets.disable_progress_bars()
    peak = _span()
    t0 = time.perf_counter()
    tok = GPT2TokenizerFast(vocab_file=str(encoder), merges_file=str(merges))
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id

    def tokenize(batch: dict) -> dict:
        prompts = tok(batch["prompt"])["input_ids"]
        answers = tok(batch["completion"])["input_ids"]
        ids = [p + a + [eos] for p, a in zip(prompts, answers, strict=True)]
        labels = [[-100] * len(p) + a + [eos] for p, a in zip(prompts, answers, strict=True)]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels}

    ds = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp / "hf-cache")
    )
    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    loader = DataLoader(
        ds, batch_size=BATCH, shuffle=True, collate_fn=DataCollatorForSeq2Seq(tok, padding=True)
    )
    batch = next(iter(loader))
    _step(model(**batch).loss, opt)
    return time.perf_counter() - t0, peak()


def measure(side: str, quick: bool) -> dict:
    n = rows(quick)
    with tempfile.TemporaryDirectory(prefix="nanotune-data-bench-") as tmp:
        tmp_path = Path(tmp)
        path = write_rows(tmp_path / "rows.jsonl", n)
        if side == "nanotune":
            seconds, grown, cached = _ours(path, tmp_path)
            note = (
                f"{n:,} rows to the first step in {seconds:,.1f} s; a second build read the "
                f"data cache in {cached:,.2f} s ({100 * cached / seconds:.1f}% of the first)"
            )
        else:
            seconds, grown = _peer(path, tmp_path)
            note = f"{n:,} rows to the first step in {seconds:,.1f} s"
    return {
        "ms_per_step": seconds * 1e3,
        "useful_per_s": n / seconds,
        "flops_per_s": 0.0,
        "peak_bytes": grown,
        "peak_kind": "RSS growth from the rows to the first step (model built before)",
        "steps": 1,
        "note": note,
    }

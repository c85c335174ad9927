"""The benchmark cases: shapes, the synthetic data both sides consume, and FLOP counts.

Everything here is side-neutral: nanotune and the transformers + peft peer build their batches
from the same `items` (same token ids, same order) and are credited with the same useful tokens
and FLOPs per step, so every ratio in the table is a ratio of wall-clock times.

Token ids are random (seeded): with random weights the FLOPs, shapes and padding are what a real
dataset of the same lengths would give, and no third-party text is needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from nanotune.models.config import PRESETS, ModelConfig

# A GPT-2 shape small enough that --quick runs every case in seconds.
QUICK_GPT2 = PRESETS["gpt2"].config.with_(n_layer=2, n_head=4, n_embd=64, block_size=256)
QUICK_LLAMA = PRESETS["smollm2-135m-instruct"].config.with_(
    n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, block_size=256
)


@dataclass(frozen=True)
class Case:
    """One workload. `kind` picks the data and the code on each side."""

    name: str
    kind: str  # sft | lm | classify | generate | serve | dpo | grpo | data
    model: str  # gpt2 | smollm2
    method: str  # lora | full | last_n | qlora | none
    description: str
    r: int = 0
    targets: tuple[str, ...] = ()
    batch: int = 8
    target_ratio: float | None = None  # useful tokens/s wanted, as a multiple of the peer's
    memory_ratio: float = 1.0  # peak memory allowed, as a fraction of the peer's
    # nanotune packs the step's examples into rows of `PACK_LENGTH` tokens (its `data.pack`);
    # the peer pads the same examples as usual. Same examples, same useful tokens per step.
    pack: bool = False
    # A whole run instead of a few steps: `epochs` passes over `Sizes.run_texts` texts, every
    # step timed (the first epoch is not a warm-up to leave out: it is where caches are built).
    epochs: int = 0
    # nanotune decodes in this `--dtype` instead of its training precision (generate cases).
    decode: str | None = None
    # Who the peer is: transformers (+ peft, TRL), or llama.cpp on the SmolLM2 GGUF
    # (`bench.llamacpp`; its bf16 row does not apply).
    peer: str = "transformers"
    # Also run nanotune compiled (`train.compile: true`; `generate --compile` for a generate
    # case, `serve --compile`, `rl.compile: true`) and, for training, the peer with
    # `TrainingArguments(torch_compile=True)`'s compile.
    compiled: bool = False
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


GRPO_G = 4  # completions per prompt (the group)
GRPO_NEW = 32  # tokens per completion (QUICK: `Sizes.gen_new`)

CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "lora-sft",
            "sft",
            "gpt2",
            "lora",
            "GPT-2 124M, LoRA r16 on c_attn, completion-only "
            "loss on prompts of 20-60 + answers of 10-20 tokens",
            r=16,
            targets=("c_attn",),
            target_ratio=3.0,
            compiled=True,
        ),
        Case(
            "lora-sft-packed",
            "sft",
            "gpt2",
            "lora",
            "lora-sft's examples, packed by nanotune into 128-token rows (peer: padded)",
            r=16,
            targets=("c_attn",),
            target_ratio=3.0,
            pack=True,
        ),
        Case(
            "full-lm",
            "lm",
            "gpt2",
            "full",
            "GPT-2 124M full fine-tuning on 128-token chunks",
            target_ratio=2.0,
            compiled=True,
        ),
        Case(
            "classify",
            "classify",
            "gpt2",
            "last_n",
            "GPT-2 124M, last block + final norm + 2-class head, texts of 20-120 tokens",
            target_ratio=2.0,
            compiled=True,
        ),
        Case(
            "classify-5ep",
            "classify",
            "gpt2",
            "last_n",
            "the spam recipe's run: GPT-2 124M, last block + final norm + 2-class head, 5 epochs "
            "over 1,000 texts of 8-64 tokens (SMS-like), batch 8, reshuffled every epoch; "
            "tok/s = all tokens over the run's wall time, ms = the median step",
            epochs=5,
            target_ratio=4.0,
        ),
        Case(
            "qlora",
            "sft",
            "gpt2",
            "qlora",
            "GPT-2 124M, NF4 base + LoRA r32 on c_attn, c_proj (same data as lora-sft)",
            r=32,
            targets=("c_attn", "c_proj"),
        ),
        Case(
            "generate-b1",
            "generate",
            "gpt2",
            "none",
            "GPT-2 124M, 32-token prompt, 128 new tokens, greedy, KV cache, batch 1; nanotune in "
            "float32 (`generate`'s default `--dtype`)",
            batch=1,
            target_ratio=3.0,
            decode="float32",  # what `nanotune generate` decodes in by default
        ),
        Case(
            "generate-b8",
            "generate",
            "gpt2",
            "none",
            "GPT-2 124M, 32-token prompts, 128 new tokens, greedy, KV cache, batch 8; nanotune in "
            "float32; nanotune-compiled is `generate --compile`",
            batch=8,
            target_ratio=3.0,
            decode="float32",  # what `nanotune generate` decodes in by default
            compiled=True,
        ),
        Case(
            "generate-b1-bf16",
            "generate",
            "gpt2",
            "none",
            "generate-b1 with nanotune decoding in bfloat16 (`--dtype bfloat16`: bf16 weights "
            "prepacked for oneDNN on CPU, bf16 activations, float32 KV cache); the peers as in "
            "generate-b1",
            batch=1,
            target_ratio=3.0,
            decode="bfloat16",
        ),
        Case(
            "generate-b8-bf16",
            "generate",
            "gpt2",
            "none",
            "generate-b8 with nanotune decoding in bfloat16 (`--dtype bfloat16`)",
            batch=8,
            target_ratio=3.0,
            decode="bfloat16",
        ),
        Case(
            "generate-b1-int8",
            "generate",
            "gpt2",
            "none",
            "generate-b1 with nanotune decoding from int8 weights (`--dtype int8`: per-channel "
            "int8 linear weights, bf16 activations, float32 KV cache); the peers as in generate-b1",
            batch=1,
            target_ratio=3.0,
            decode="int8",
        ),
        Case(
            "generate-b8-int8",
            "generate",
            "gpt2",
            "none",
            "generate-b8 with nanotune decoding from int8 weights (`--dtype int8`)",
            batch=8,
            target_ratio=3.0,
            decode="int8",
        ),
        Case(
            "decode-q8-b1",
            "generate",
            "smollm2",
            "none",
            "SmolLM2-135M (real weights) as a Q8_0 GGUF that nanotune exports from the embedded "
            "file, 32-token prompt, 128 new tokens, greedy, batch 1: nanotune loads the file and "
            "decodes with `--dtype int8`; the peer is llama.cpp (llama-cpp-python's C API) on "
            "the same file, in its own Q8_0 kernels",
            batch=1,
            target_ratio=0.8,
            decode="int8",
            peer="llama.cpp",
            compiled=True,
        ),
        Case(
            "decode-q8-b8",
            "generate",
            "smollm2",
            "none",
            "decode-q8-b1 with 8 prompts decoded together (llama.cpp: one batch of 8 sequences "
            "per step, as its `batched` example does)",
            batch=8,
            target_ratio=2.0,
            decode="int8",
            peer="llama.cpp",
            compiled=True,
        ),
        Case(
            "smollm2-lora",
            "sft",
            "smollm2",
            "lora",
            "SmolLM2-135M (real weights), LoRA r16 on all linear layers, same data as lora-sft",
            r=16,
            targets=("all-linear",),
            target_ratio=2.5,
            compiled=True,
        ),
        Case(
            "smollm2-lora-packed",
            "sft",
            "smollm2",
            "lora",
            "smollm2-lora's examples, packed by nanotune into 128-token rows (peer: padded)",
            r=16,
            targets=("all-linear",),
            target_ratio=2.5,
            pack=True,
        ),
        Case(
            "dpo",
            "dpo",
            "smollm2",
            "lora",
            "SmolLM2-135M (real weights), LoRA r16 on all linear layers, DPO (sigmoid, beta 0.1) "
            "with the adapters-off base as reference, on pairs of a 20-60-token prompt and two "
            "responses of 10-20 tokens; batch = preference pairs (peer: TRL `DPOTrainer`)",
            r=16,
            targets=("all-linear",),
            target_ratio=2.0,
            memory_ratio=0.6,
        ),
        Case(
            "grpo",
            "grpo",
            "smollm2",
            "lora",
            "SmolLM2-135M (real weights), LoRA r16 on all linear layers, GRPO (loss dapo, beta 0) "
            f"on 4 prompts of 20-60 tokens x {GRPO_G} sampled completions of exactly "
            f"{GRPO_NEW} tokens each, a reward on their length; a step samples, scores and "
            "trains once; tok/s = generated tokens (peer: TRL `GRPOTrainer`, transformers "
            "generation)",
            r=16,
            targets=("all-linear",),
            batch=4,
            target_ratio=5.0,
            memory_ratio=0.5,
            compiled=True,
        ),
        Case(
            "serve",
            "serve",
            "smollm2",
            "none",
            "SmolLM2-135M (real weights, one HF folder for both) behind each side's "
            "OpenAI-compatible server (peer: `transformers serve --continuous-batching`): 200 "
            "greedy chat completions of up to 32 tokens from 16 concurrent clients on loopback; "
            "tok/s = generated tokens over wall time, ms = p50 latency, memory = the sum of "
            "each server process's peak RSS, children included",
            batch=16,
            target_ratio=3.0,
            compiled=True,
        ),
        Case(
            "data-100k",
            "data",
            "gpt2",
            "lora",
            "100,000 completion rows (~141 GPT-2 tokens each) from a JSONL file to the first "
            "LoRA step on a small GPT-2 (peer: `datasets` load + `map(batched=True)` + "
            "`DataCollatorForSeq2Seq`); ms = seconds to that step, tok/s = rows/s, memory = "
            "RSS growth over the span (the model is built before it)",
            r=16,
            targets=("c_attn",),
            target_ratio=3.0,
        ),
    ]
}

PACK_LENGTH = 128


@dataclass(frozen=True)
class Sizes:
    """How much work a run does: full size for the table, tiny for --quick."""

    warmup: int
    timed: int
    chunk: int  # tokens per full-lm row
    prompt: tuple[int, int]  # sft prompt length range
    answer: tuple[int, int]  # sft answer length range (EOS included)
    text: tuple[int, int]  # classify text length range
    gen_prompt: int
    gen_new: int
    run_texts: int  # texts of a whole-run case (`Case.epochs`)
    run_text: tuple[int, int]  # their length range
    run_epochs: int | None  # caps Case.epochs (None: as the case says)


FULL = Sizes(
    warmup=2,
    timed=5,
    chunk=128,
    prompt=(20, 60),
    answer=(10, 20),
    text=(20, 120),
    gen_prompt=32,
    gen_new=128,
    run_texts=1000,
    run_text=(8, 64),
    run_epochs=None,
)
QUICK = Sizes(
    warmup=1,
    timed=2,
    chunk=32,
    prompt=(8, 16),
    answer=(4, 8),
    text=(8, 24),
    gen_prompt=8,
    gen_new=8,
    run_texts=12,
    run_text=(8, 24),
    run_epochs=2,
)


def sizes(quick: bool) -> Sizes:
    return QUICK if quick else FULL


def grpo_new(quick: bool) -> int:
    return sizes(quick).gen_new if quick else GRPO_NEW


def model_config(case: Case, quick: bool) -> ModelConfig:
    """The architecture both sides build (SmolLM2 full size comes from the real checkpoint)."""
    if case.model == "smollm2":  # llama.cpp reads the real GGUF, --quick too
        small = quick and case.peer != "llama.cpp"
        return QUICK_LLAMA if small else PRESETS["smollm2-135m-instruct"].config
    return QUICK_GPT2 if quick else PRESETS["gpt2"].config


def epochs(case: Case, quick: bool) -> int:
    """Passes of a whole-run case (0 for a step case)."""
    cap = sizes(quick).run_epochs
    return min(case.epochs, cap) if cap and case.epochs else case.epochs


def batch_size(case: Case, quick: bool) -> int:
    return min(case.batch, 2) if quick else case.batch


def items(case: Case, quick: bool) -> list[Any]:
    """One item per step (warm-up first): the raw rows of a batch, or generation prompts.

    sft: list of (prompt ids, answer ids), the answer ending in EOS.
    dpo: list of (prompt ids, chosen ids, rejected ids), both responses ending in EOS.
    lm: list of token-id rows of equal length.
    classify: list of (ids, class).
    generate: list of prompts of equal length.
    grpo: list of prompts (ids) of uneven length.
    """
    s, cfg, B = sizes(quick), model_config(case, quick), batch_size(case, quick)
    rng = random.Random(f"{case.kind}-{case.model}-{quick}")
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else cfg.vocab_size - 1
    # Never draw EOS (GPT-2's pad): the peer's classifier finds the last real token by pad id.
    top = cfg.vocab_size - 1 - (eos == cfg.vocab_size - 1)

    def ids(n: int) -> list[int]:
        return [rng.randint(3, top) for _ in range(n)]

    steps = s.warmup + s.timed
    if case.kind == "sft":
        return [
            [
                (ids(rng.randint(*s.prompt)), ids(rng.randint(*s.answer) - 1) + [eos])
                for _ in range(B)
            ]
            for _ in range(steps)
        ]
    if case.kind == "dpo":
        return [
            [
                (
                    ids(rng.randint(*s.prompt)),
                    ids(rng.randint(*s.answer) - 1) + [eos],
                    ids(rng.randint(*s.answer) - 1) + [eos],
                )
                for _ in range(B)
            ]
            for _ in range(steps)
        ]
    if case.kind == "lm":
        return [[ids(s.chunk) for _ in range(B)] for _ in range(steps)]
    if case.kind == "grpo":
        return [[ids(rng.randint(*s.prompt)) for _ in range(B)] for _ in range(steps)]
    if case.kind == "classify" and case.epochs:  # the texts once, in a new order each epoch
        texts = [(ids(rng.randint(*s.run_text)), rng.randint(0, 1)) for _ in range(s.run_texts)]
        out = []
        for _ in range(epochs(case, quick)):
            order = rng.sample(texts, len(texts))
            out += [order[i : i + B] for i in range(0, len(order), B)]
        return out
    if case.kind == "classify":
        return [
            [(ids(rng.randint(*s.text)), rng.randint(0, 1)) for _ in range(B)] for _ in range(steps)
        ]
    return [[ids(s.gen_prompt) for _ in range(B)] for _ in range(steps)]


# ----- FLOPs ---------------------------------------------------------------------------------


def block_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's linears (biases and norms are not matmul work)."""
    d, hd = cfg.n_embd, cfg.hd
    qkv = d * (cfg.n_head + 2 * cfg.kv_heads) * hd
    fc = d * (2 if cfg.mlp == "swiglu" else 1) * cfg.ffn
    return qkv + cfg.n_head * hd * d + fc + cfg.ffn * d


def lora_params(case: Case, cfg: ModelConfig) -> int:
    """Adapter weights (A and B) over all blocks, as PEFT counts them."""
    d, hd, f = cfg.n_embd, cfg.hd, cfg.ffn
    q, kv = cfg.n_head * hd, cfg.kv_heads * hd
    per = {  # (in, out) of every HF module a target name can match
        "c_attn": [(d, q + 2 * kv)],
        "c_proj": [(q, d), (f, d)],
        "all-linear": [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)],
    }
    return cfg.n_layer * sum(case.r * (i + o) for t in case.targets for i, o in per[t])


def forward_flops(cfg: ModelConfig, lengths: list[int], head_tokens: int) -> float:
    """FLOPs of one forward over rows of `lengths` real tokens, the LM head at `head_tokens`
    positions only (see `train_flops`)."""
    N = cfg.n_layer * block_matmul_params(cfg)
    attn = 2 * cfg.n_layer * cfg.n_head * cfg.hd * sum(n * n for n in lengths)
    return 2 * N * sum(lengths) + attn + 2 * cfg.vocab_size * cfg.n_embd * head_tokens


def train_flops(case: Case, cfg: ModelConfig, lengths: list[int], head_tokens: int) -> float:
    """FLOPs of one training step, counting only useful work.

    The 6·N·tokens rule split into its parts, so frozen weights are not credited with gradients:
      forward 2·N·T; input gradients 2·N·T through every block the gradient crosses; weight
      gradients 2·N_trainable·T; LoRA adapters 6·P·T. T counts real tokens only (padding is
      waste), and the LM head (2·V·C per token forward, as much again backward, plus its weight
      gradient when trained) counts only tokens that have a target.
    Attention (causal, counted as the half the mask keeps): 2·H·D·len² per layer forward per row,
    twice that backward.
    """
    N, L = cfg.n_layer * block_matmul_params(cfg), cfg.n_layer
    T = sum(lengths)
    attn = 2 * L * cfg.n_head * cfg.hd * sum(n * n for n in lengths)
    head = 2 * cfg.vocab_size * cfg.n_embd * head_tokens
    forward = forward_flops(cfg, lengths, head_tokens)
    if case.method == "last_n":  # gradients flow through the last block only
        return forward + (2 * N * T + 2 * attn) / L + 2 * N * T / L
    input_grads = 2 * N * T + 2 * attn + head
    if case.method == "full":
        return forward + input_grads + 2 * N * T + head
    return forward + input_grads + 6 * lora_params(case, cfg) * T


def generate_flops(cfg: ModelConfig, batch: int, prompt: int, new: int) -> float:
    """Prefill of the prompt, then one token at a time against the cache.

    The head runs on new tokens only."""
    N = cfg.n_layer * block_matmul_params(cfg)
    hdim = cfg.n_head * cfg.hd
    head = 2 * cfg.vocab_size * cfg.n_embd
    prefill = 2 * N * prompt + 2 * cfg.n_layer * hdim * prompt * prompt
    decode = sum(2 * N + 4 * cfg.n_layer * hdim * (prompt + t + 1) for t in range(new - 1))
    return batch * (prefill + decode + new * head)


def step_stats(case: Case, quick: bool, item: Any) -> tuple[int, float]:
    """(useful tokens, FLOPs) of one step: the same for both sides."""
    cfg = model_config(case, quick)
    if case.kind == "sft":
        lengths = [len(p) + len(a) for p, a in item]
        useful = sum(len(a) for _, a in item)  # supervised tokens
        return useful, train_flops(case, cfg, lengths, useful)
    if case.kind == "dpo":
        # Both sequences of every pair; useful = response tokens, the ones whose log-probs the
        # loss sums (chosen and rejected). The reference (adapters off) is one more forward.
        lengths = [len(p) + len(y) for p, c, r in item for y in (c, r)]
        useful = sum(len(c) + len(r) for _, c, r in item)
        return useful, train_flops(case, cfg, lengths, useful) + forward_flops(cfg, lengths, useful)
    if case.kind == "lm":
        lengths = [len(r) for r in item]
        return sum(lengths), train_flops(case, cfg, lengths, sum(n - 1 for n in lengths))
    if case.kind == "grpo":
        # Sampling G completions of every prompt, then one training pass over prompt +
        # completion rows with the head at completion tokens; useful = generated tokens.
        new = grpo_new(quick)
        lengths = [len(p) + new for p in item for _ in range(GRPO_G)]
        useful = len(lengths) * new
        sample = sum(generate_flops(cfg, GRPO_G, len(p), new) for p in item)
        return useful, sample + train_flops(case, cfg, lengths, useful)
    if case.kind == "classify":
        lengths = [len(ids) for ids, _ in item]
        return sum(lengths), train_flops(case, cfg, lengths, 0)
    s = sizes(quick)
    return len(item) * s.gen_new, generate_flops(cfg, len(item), s.gen_prompt, s.gen_new)

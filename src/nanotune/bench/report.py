"""The markdown that `nanotune bench` writes: machine, table, targets, and how it was measured."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
from dataclasses import dataclass

import torch

from nanotune.bench.cases import CASES, FULL, QUICK
from nanotune.hardware import cpu_flags, cpu_model


def memory_target(ratio: float) -> str:
    return "peak memory ≤ peer" if ratio == 1.0 else f"peak memory ≤ {ratio:.0%} of peer"


@dataclass
class SideResult:
    """One case on one side: the worker's numbers, or why there are none."""

    ms_per_step: float = 0.0
    useful_per_s: float = 0.0
    flops_per_s: float = 0.0
    peak_bytes: int = 0
    peak_kind: str = ""
    steps: int = 0
    na: str | None = None  # not applicable here (reason)
    error: str | None = None  # the run failed (last line of its stderr)
    note: str | None = None  # what the numbers alone do not say (the serve case's latencies)
    precision: str | None = None  # float32, bfloat16, int8 (decode weights), GGUF <type>
    compile_s: float | None = None  # a compiled side's compile seconds (None: ran eager)

    @property
    def ok(self) -> bool:
        return self.na is None and self.error is None


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
"""The CPU features that decide which kernels are fast here.

bf16 matmuls need avx512_bf16 or AMX."""


def isa(device: str) -> str:
    """The ISA_FLAGS this CPU reports (/proc/cpuinfo), or what the GPU is."""
    if device == "cuda":
        return f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
    if not cpu_flags():
        return "unknown (no /proc/cpuinfo)"
    return ", ".join(f for f in ISA_FLAGS if f in cpu_flags()) or "none of " + ", ".join(ISA_FLAGS)


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("transformers", "peft", "trl", "torchao"):
        try:  # metadata only: importing transformers here would cost seconds
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


OURS = ("nanotune", "nanotune-compiled")
PEERS = ("peer", "peer-bf16", "peer-compile")


def _fastest(sides: dict[str, SideResult], names: tuple[str, ...]):
    ran = [(name, sides[name]) for name in names if name in sides and sides[name].ok]
    return max(ran, key=lambda kv: kv[1].useful_per_s) if ran else None


def faster_peer(sides: dict[str, SideResult]) -> tuple[str, SideResult] | None:
    """The peer run (float32, bf16 autocast or torch.compile) with the most useful tokens/s;
    None if none ran."""
    return _fastest(sides, PEERS)


def faster_ours(sides: dict[str, SideResult]) -> tuple[str, SideResult] | None:
    """nanotune's faster run, eager or compiled (what `train.compile: auto` would pick for a
    run long enough to win the compile back); None if neither ran."""
    return _fastest(sides, OURS)


def _compiled(side: str, r: SideResult) -> str:
    if r.compile_s is None:
        return "eager"
    how = "torch_compile" if side.startswith("peer") else "compiled"
    return f"{how}, {r.compile_s:,.0f} s"


def _row(case: str, side: str, r: SideResult, best: tuple[str, SideResult] | None, peaks) -> str:
    if not r.ok:  # "|" escaped: a dead process's last stderr line may hold one
        why = (r.na or "FAILED: " + str(r.error)).replace("|", "\\|")
        return f"| {case} | {side} | – | – | – | – | – | – | – | – | {why} |"
    ratio = ""
    if side in OURS and best is not None:
        ratio = f"{r.useful_per_s / best[1].useful_per_s:.2f}× {best[0]}"
    peak = peaks.get(r.precision) or peaks["float32"]
    return (
        f"| {case} | {side} | {r.precision or '–'} | {_compiled(side, r)} | "
        f"{r.useful_per_s:,.0f} | {ratio} | "
        f"{r.ms_per_step:,.1f} | {_mib(r.peak_bytes)} | "
        f"{_small(r.flops_per_s / 1e9) if r.flops_per_s else '–'} | "
        f"{f'{_small(100 * r.flops_per_s / peak)}%' if r.flops_per_s else '–'} | {r.note or ''} |"
    )


def _small(x: float) -> str:
    """One decimal, but significant digits below 1 (--quick shapes give tiny rates, not zero)."""
    return f"{x:,.1f}" if x >= 1 else f"{x:.2g}"


DENSE_TARGET = {"bfloat16": 40.0, "float32": 60.0}
"""% of its precision's matmul peak a dense (full fine-tuning) step should reach: bf16's peak on
AMX is several times fp32's, and the norms, activations and casts between the products do not
shrink with it."""


def _targets(results: dict[str, dict[str, SideResult]], peaks: dict[str, float]) -> list[str]:
    lines = ["| case | target | measured | met |", "|---|---|---|---|"]
    missed = []
    for case, sides in results.items():
        mine, best = faster_ours(sides), faster_peer(sides)
        want = CASES[case].target_ratio
        if mine is None or best is None:
            lines.append(
                f"| {case} | {f'≥ {want}× peer tokens/s' if want else '–'} | "
                "no comparison (see table) | – |"
            )
            continue
        (side, ours), (name, peer) = mine, best
        checks = []
        if want is not None:
            got = ours.useful_per_s / peer.useful_per_s
            checks.append((f"≥ {want}× peer tokens/s", f"{got:.2f}× {name} ({side})", got >= want))
        if CASES[case].method == "full":
            pct = 100 * ours.flops_per_s / (peaks.get(ours.precision) or peaks["float32"])
            dense = DENSE_TARGET.get(ours.precision or "float32", DENSE_TARGET["float32"])
            checks.append(
                (
                    f"≥ {dense:.0f}% of the {ours.precision} matmul peak",
                    f"{pct:.1f}% ({side})",
                    pct >= dense,
                )
            )
        share = CASES[case].memory_ratio
        checks.append(
            (
                memory_target(share),
                f"{_mib(ours.peak_bytes)} vs {_mib(peer.peak_bytes)} MiB {name} ({side})"
                + (f" ({ours.peak_bytes / peer.peak_bytes:.0%})" if share != 1.0 else ""),
                ours.peak_bytes <= share * peer.peak_bytes,
            )
        )
        for target, got, met in checks:
            lines.append(f"| {case} | {target} | {got} | {'yes' if met else '**no**'} |")
            if not met:
                missed.append(f"{case} ({target}: {got})")
    if missed:
        lines += [
            "",
            "Missed: " + "; ".join(missed) + ". Why, and the next idea for each, from "
            "profiles: [benchmarks/NOTES.md](benchmarks/NOTES.md).",
        ]
    return lines


def render(
    results: dict[str, dict[str, SideResult]],
    *,
    peak: float,
    bf16_peak: float | None = None,
    precision: str = "",
    quick: bool,
    device: str,
    command: str,
    llama_cpp: str | None = None,
    notes: str | None = None,
) -> str:
    """The markdown report; `llama_cpp` is llama.cpp's build line (`llamacpp.system_info`) where
    a case runs it; `notes` (benchmarks/NOTES.md, hand-written) is appended verbatim."""
    s = QUICK if quick else FULL
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kinds = sorted({r.peak_kind for sides in results.values() for r in sides.values() if r.ok})
    out = [
        "# Benchmarks: nanotune vs transformers + peft",
        "",
        "Generated by the command below; do not edit by hand (notes: benchmarks/NOTES.md).",
        "",
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {machine(device)}; device {device}",
        f"- ISA: {isa(device)}",
        f"- software: {_versions()}",
        *([f"- llama.cpp: {llama_cpp}"] if llama_cpp else []),
        "- matmul peak (best GEMM of torch.mm and oneDNN, measured before and after the cases "
        "of this run, the better kept): fp32 "
        f"{peak / 1e9:,.1f} GFLOP/s"
        + (f", bf16 {bf16_peak / 1e9:,.1f} GFLOP/s" if bf16_peak else "")
        + "; a row's fraction of peak is of its own precision's peak (int8 decoding: bf16's, "
        "its activations' precision; llama.cpp's GGUF rows: fp32's)",
        f"- nanotune's precision here: {precision or 'float32'}; the peer runs float32 (`peer`), "
        "under its bf16 autocast (`peer-bf16`) and, where a case has compiled rows, in float32 "
        "through `torch.compile` (`peer-compile`, what `TrainingArguments(torch_compile=True)` "
        "does): its three one-flag configurations, and every ratio is against the fastest of "
        "them (the decode-q8 cases' peer is llama.cpp on the same Q8_0 GGUF, in its own "
        "kernels)",
        "- compile: `nanotune-compiled` is nanotune with `train.compile: true` (each block's "
        "forward and backward through torch.compile, lengths as symbols), `generate --compile`, "
        "`serve --compile` or `rl.compile: true` (decode steps through torch.compile); "
        "its compile seconds are the warm-up steps' time beyond timed steps', and are not in "
        "ms/step (a run pays them once; `train.compile: auto` compiles only runs long enough to "
        "win them back). The targets take nanotune's faster row, eager or compiled",
        f"- steps: {s.warmup} warm-up (not timed) + {s.timed} timed, medians reported",
    ]
    if quick:
        out += ["", "**--quick: tiny model shapes; a smoke test of the harness, not a benchmark.**"]
    out += [
        "",
        "| case | side | precision | compile | useful tok/s | vs fastest peer | ms/step | "
        "peak MiB | GFLOP/s | of matmul peak | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peaks = {"float32": peak, "bfloat16": bf16_peak or peak, "int8": bf16_peak or peak}
    for case, sides in results.items():
        for side, r in sides.items():
            out.append(_row(case, side, r, faster_peer(sides), peaks))
    out += ["", "## Targets", "", *_targets(results, peaks), "", "## Cases", ""]
    out += [
        f"- **{name}**: {CASES[name].description}, batch {CASES[name].batch}." for name in results
    ]
    out += [
        "",
        "## How it is measured",
        "",
        "- Same machine, same run, same synthetic token ids (seeded) in the same order on both "
        "sides; random weights except SmolLM2 (same FLOPs as trained ones). Batches are built "
        "before timing on both sides; a step is forward, backward, gradient clipping (norm 1) and "
        "a fused AdamW step (lr 1e-4, no weight decay) — transformers `Trainer`'s defaults.",
        "- Peer: `transformers` model (default sdpa attention) + `peft` LoRA, dynamic padding to "
        "the longest row, labels -100 on prompt and padding, `model.train()`; SmolLM2 loaded with "
        "`from_pretrained(..., gguf_file=...)`; generation `model.generate(do_sample=False)` with "
        "`min_new_tokens` = `max_new_tokens`. nanotune: `Transformer`, `apply_method`, "
        "`nanotune.data` collate, `nanotune.training.losses`, the trainer's `build_optimizer`, "
        "`nanotune.generate.generate_ids` with no stop tokens.",
        "- Precision: `peer-bf16` runs the peer's forward under `torch.autocast(device, "
        "torch.bfloat16)` (what `TrainingArguments(bf16=True)` does on CPU; generation under the "
        "same autocast; `transformers serve --dtype bfloat16` for serve); nanotune runs what "
        "`train.dtype: auto` picks on this machine: bf16 autocast with float32 master weights "
        "where the CPU multiplies bf16 natively (AVX512_BF16/AMX), float32 elsewhere; serve the "
        "same choice as its `--dtype` (bf16 weights, the KV cache float32 on CPU); the generate "
        "cases the `--dtype` their row names (float32, `generate`'s default, bfloat16 or int8).",
        "- dpo: the peer is TRL's `DPOTrainer` (peft `LoraConfig` passed as `peft_config`, so its "
        "reference is the model with adapters disabled; `precompute_ref_log_probs=False`, its "
        "`bf16` flag as the side's precision, "
        "no gradient checkpointing, no eval/logging/saving); a step is its `training_step` on a "
        "batch from its own collator, then clipping, the optimizer it creates and zeroed "
        "gradients. nanotune: `collate_preference` (a row per pair: the prompt once, both "
        "responses attending to it) and `PreferenceObjective('dpo')` with the reference under "
        "`adapters_disabled`. Same pairs, same LoRA, beta 0.1 on both; FLOPs count both whole "
        "sequences of every pair, as the peer computes them.",
        "- grpo: the peer is TRL's `GRPOTrainer` with a peft `LoraConfig`, transformers "
        "generation (no vLLM), beta 0 and loss dapo (its defaults), one generation per step, "
        "completions forced to the case's length (`min_new_tokens`); a step is its "
        "`training_step` on the G copies of each prompt (generate, score, advantages, loss, "
        "backward), then clipping and its optimizer. nanotune: `GRPOObjective.prepare` (the "
        "decoding engine over the live LoRA policy, no stop token) and its loss, as the trainer "
        "runs them. Same prompts (the peer gets them as decoded text), same G, lengths, LoRA and "
        "reward; FLOPs count sampling (prefill and decode per completion) and the training "
        "pass; useful tokens are the generated ones.",
        "- Useful tokens: supervised (answer) tokens for SFT cases, response tokens of chosen "
        "and rejected for dpo, non-pad tokens for full-lm "
        "and classify, generated tokens for generation. tokens/s is the median over timed steps "
        "of each step's rate; ms/step the median step time.",
        "- FLOP/s: useful FLOPs per step (identical for both sides) over its time. Training: "
        "the 6·N·T rule split into forward 2·N·T, input gradients 2·N·T (only through the "
        "blocks the gradient crosses), weight gradients 2·N·T (trained weights only), LoRA "
        "adapters 6·P·T; N = block matmul weights, T = real tokens; LM head 2·V·C per "
        "supervised token forward, as much backward (+ its weight gradient when trained); "
        "causal attention 2·H·D·len² per layer forward, twice that backward; dpo adds the "
        "reference's forward (head at response tokens). Generation: "
        "prefill 2·N·prompt + attention, then 2·N + 4·L·H·D·context per new token, head on new "
        "tokens only. Compared with the GEMM peak of the row's precision above.",
        f"- Peak memory: {', '.join(kinds) or 'n/a'} over the baseline after imports, in a fresh "
        "process per case and side, reset once the model is built (loading transients are not "
        "counted; weights, activations, gradients and optimizer state are).",
    ]
    if notes:
        body = notes.split("\n", 1)[1] if notes.startswith("# ") else notes
        out += ["", "## Why targets are missed, and what next (benchmarks/NOTES.md)", body.strip()]
    return "\n".join(out) + "\n"

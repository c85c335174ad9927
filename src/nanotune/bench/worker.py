"""One case on one side, in a fresh process: `python -m nanotune.bench.worker CASE SIDE ...`.

A fresh process per case and side keeps the memory figures apart: peak memory is the resident
set's high-water mark over the baseline taken after imports, reset (Linux `clear_refs`) once the
model is built, so loading transients are left out and weights, activations, gradients and
optimizer state are in. On CUDA it is `torch.cuda.max_memory_allocated` over the same span.
Prints one line `RESULT <json>` on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time

import torch

from nanotune.bench import cases
from nanotune.bench.workload import (
    COMPILED_SIDES,
    MARK,
    OURS_COMPILED,
    PEER_BF16,
    PEER_COMPILED,
    NotApplicable,
    peak_since,
    reset_peak,
    rss,
    side_precision,
)


def _import_lazy_modules(device: str) -> None:
    """The first fused AdamW imports torch's compiler stack (~70 MB): do it before the baseline
    on both sides so neither is charged for it."""
    p = torch.nn.Parameter(torch.zeros(2, device=device))
    p.grad = torch.zeros_like(p)
    torch.optim.AdamW([p], fused=True).step()


def _graphs() -> int:
    """Frames torch.compile has compiled in this process (a recompile counts again)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def measure(case_name: str, side: str, quick: bool, device: str, source: str | None) -> dict:
    case = cases.CASES[case_name]
    precision = side_precision(side, device)
    if side in ("nanotune", OURS_COMPILED) and case.decode:  # `--dtype`, not training's
        precision = case.decode
    if case.kind == "serve":  # a load test of two server processes, not a step loop
        from nanotune.bench import serving

        try:
            return {**serving.measure(side, quick, source, precision), "precision": precision}
        except NotApplicable as e:
            return {"na": str(e)}
    if case.kind == "data":  # rows to the first step: the data pipeline, not a step loop
        from nanotune.bench import datapipe

        if side == PEER_BF16:
            return {"na": "n/a: tokenizing and batching compute nothing in either precision"}
        return datapipe.measure(side, quick)
    if side in ("nanotune", OURS_COMPILED):
        from nanotune.bench import ours as impl
    elif case.peer == "llama.cpp":
        from nanotune.bench import llamacpp as impl

        if side == PEER_BF16:
            return {"na": "n/a: llama.cpp computes in the GGUF's own quantization"}
        precision = impl.gguf_precision(source)
    else:
        from nanotune.bench import peer as impl
    try:
        impl.import_libraries(case)
    except NotApplicable as e:
        return {"na": str(e)}
    _import_lazy_modules(device)
    gc.collect()
    baseline = rss("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        baseline = torch.cuda.memory_allocated()
    items = cases.items(case, quick)
    try:
        work = impl.build(
            case, quick, device, items, source, precision, compiled=side in COMPILED_SIDES
        )
    except NotApplicable as e:
        return {"na": str(e)}
    gc.collect()
    how = reset_peak(device)
    warmup = cases.sizes(quick).warmup
    compiling = side in COMPILED_SIDES
    frames = []  # graphs torch.compile has made, before each step (compiled sides)
    ms = []
    for x in work.inputs:
        if compiling:
            frames.append(_graphs())
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        work.step(x)
        if device == "cuda":
            torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    stats = [cases.step_stats(case, quick, item) for item in items]
    peak = peak_since(device, how, baseline)
    if case.epochs:  # a whole run: every step counts, rates over the run's wall time
        seconds = sum(ms) / 1e3
        return {
            "ms_per_step": statistics.median(ms),
            "useful_per_s": sum(u for u, _ in stats) / seconds,
            "flops_per_s": sum(f for _, f in stats) / seconds,
            "peak_bytes": peak,
            "peak_kind": how,
            "steps": len(ms),
            "precision": precision,
            "note": f"{cases.epochs(case, quick)} epochs, {len(ms)} steps in {seconds:,.1f} s",
        }
    timed = list(zip(ms, stats, strict=True))[warmup:]
    compiled = {}
    if compiling:  # the warm-up steps compile: their time beyond a timed step's
        median = statistics.median(t for t, _ in timed)
        total, late = _graphs() - frames[0], _graphs() - frames[warmup]
        compiled = {
            "compile_s": max(0.0, sum(ms[:warmup]) - warmup * median) / 1e3,
            "note": f"{total} graph(s) compiled, {late} of them in timed steps",
        }
    return {
        **compiled,
        "ms_per_step": statistics.median(t for t, _ in timed),
        # Median over steps of each step's rate: robust to a noisy step, fair to uneven batches.
        "useful_per_s": statistics.median(u / (t / 1e3) for t, (u, _) in timed),
        "flops_per_s": statistics.median(f / (t / 1e3) for t, (_, f) in timed),
        "peak_bytes": peak,
        "peak_kind": how,
        "steps": len(timed),
        "precision": precision,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanotune.bench.worker")
    p.add_argument("case", choices=sorted(cases.CASES))
    p.add_argument("side", choices=["nanotune", OURS_COMPILED, "peer", PEER_BF16, PEER_COMPILED])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--source", help="SmolLM2 checkpoint (.gguf file or HF folder)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = measure(args.case, args.side, args.quick, args.device, args.source)
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

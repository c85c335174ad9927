"""The GPU check: what only a GPU can show, in one run and one summary table.

    python -m nanotune.bench.gpu_check --device cuda        (what `make gpu-check` runs)

1. tests: every test marked `device` (precision, compiled steps; see tests/conftest.py) run
   with `--device cuda`: float16 + GradScaler against float32, `train.dtype: auto` on the real
   card (bf16 from compute capability 8.0, float16 before), compiled = eager steps for GPT-2 and
   Llama with LoRA and full, a compiled bf16 step, no recompiles over varied lengths;
2. compile: eager against compiled training steps through the real Trainer (tokens/s, compile
   seconds, the break-even in seconds of eager steps: what `train.compile: auto` should use);
3. bench: `nanotune bench --device cuda --quick` (both sides, a report file).

On a machine without CUDA every part is reported skipped with the reason and the check exits 0;
`--device cpu` runs the same parts on the CPU (how the logic is tested, and the CPU's figures).
A part that fails makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
TESTS = REPO / "tests"
PARTS = ("tests", "compile", "bench")


@dataclass
class Row:
    part: str
    what: str
    result: str  # ok, FAILED, skipped
    detail: str = ""


def device_unavailable(device: str) -> str | None:
    """Why `device` cannot run here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return None


def device_test_files(tests: Path = TESTS) -> list[Path]:
    """The test files with a `device`-marked test."""
    return sorted(p for p in tests.glob("test_*.py") if "pytest.mark.device" in p.read_text())


def junit_rows(xml_text: str) -> list[Row]:
    """One row per test file of a pytest JUnit report: passed/failed/skipped counts, the
    failures' names and the skip reasons."""
    counts: dict[str, dict[str, list[str]]] = {}
    for case in ET.fromstring(xml_text).iter("testcase"):
        module = case.get("classname", "").split(".")[-1] or "?"
        name = case.get("name", "?")
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                why = found.get("message", "") if tag == "skipped" else name
                break
        counts.setdefault(module, {"passed": [], "failed": [], "skipped": []})[outcome].append(
            why or name
        )
    rows = []
    for module, c in sorted(counts.items()):
        summary = ", ".join(f"{len(v)} {k}" for k, v in c.items() if v)
        notes = [f"failed: {', '.join(c['failed'])}"] if c["failed"] else []
        reasons = sorted({r.removeprefix("Skipped: ") for r in c["skipped"]})
        notes += [f"skipped: {r}" for r in reasons]
        result = "FAILED" if c["failed"] else "ok" if c["passed"] else "skipped"
        rows.append(Row("tests", f"{module}.py", result, "; ".join([summary, *notes])))
    return rows


def run_tests(device: str, timeout: float = 600) -> list[Row]:
    """The `device`-marked tests with `--device DEVICE`, in a pytest subprocess."""
    if not TESTS.is_dir():
        return [Row("tests", "device tests", "skipped", f"no tests/ beside {REPO / 'src'}")]
    files = device_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "device", f"--device={device}"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}", *map(str, files)]
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [Row("tests", "device tests", "FAILED", f"past {timeout:.0f} s")]
        if not xml.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return [Row("tests", "device tests", "FAILED", " | ".join(tail))]
        return junit_rows(xml.read_text())


def break_even_s(eager_tps: float, compiled_tps: float, compile_s: float) -> float:
    """Seconds of eager training after which compiling has paid for itself (inf: never).

    Compiled, T eager seconds of work take T * eager/compiled seconds, plus the compile."""
    if compiled_tps <= eager_tps:
        return math.inf
    return compile_s / (1 - eager_tps / compiled_tps)


def _timing_case(device: str, family: str, method: str):
    """(model, batches by epoch, micro-batch size) of one compile timing: GPT-2 small's shape
    on a GPU; on a CPU a 4-layer, 256-wide model (a larger one would take minutes eager)."""
    from nanotune.methods import MethodConfig, apply_method
    from nanotune.models import PRESETS, Transformer

    base = PRESETS["gpt2" if family == "gpt2" else "smollm2-135m-instruct"].config
    if device == "cpu":
        small = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, block_size=256)
        if family != "gpt2":
            small |= dict(n_kv_head=2, intermediate_size=768)
        base = base.with_(**small)
    rows, max_len = (8, 256) if device == "cuda" else (4, 64)
    torch.manual_seed(0)
    model = apply_method(Transformer(base), MethodConfig(name=method, r=8, alpha=16))

    def batches(epoch: int) -> list[dict]:
        g = torch.Generator().manual_seed(epoch)
        out = []
        for _ in range(8):
            lengths = torch.randint(max_len // 4, max_len + 1, (rows,), generator=g)
            ids = torch.randint(1, base.vocab_size, (rows, int(lengths.max())), generator=g)
            targets = ids.roll(-1, 1)
            for r, n in enumerate(lengths.tolist()):
                targets[r, n - 1 :] = -100
            out.append({"input_ids": ids, "targets": targets})
        return out

    return model, batches, rows


def _steady(metrics: Path, skip: int) -> float:
    """Tokens per second over the steps after the first `skip` (each step is one record)."""
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][skip:]
    tokens = sum(r["tokens"] for r in steps)
    return tokens / sum(r["tokens"] / r["tokens_per_s"] for r in steps)


def compile_timing(device: str, steps: int = 10) -> list[Row]:
    """Eager and compiled runs of the Trainer on the same batches: steady tokens/s of each,
    the compile seconds and the break-even."""
    from nanotune.training import TrainConfig, Trainer
    from nanotune.training.precision import compute_precision

    out = []
    for family, method in (("llama", "lora"), ("gpt2", "full")):
        tps, compile_s = {}, 0.0
        precision = compute_precision(TrainConfig(), torch.device(device))[0]
        for mode in (False, True):
            torch._dynamo.reset()
            model, batches, rows = _timing_case(device, family, method)
            cfg = TrainConfig(max_steps=steps, micro_batch_size=rows, compile=mode, device=device)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(model, cfg, batches, tmp, progress=False)
                trainer.fit()
                tps[mode] = _steady(Path(tmp) / "metrics.jsonl", skip=2)
                if mode:
                    compile_s = trainer.compiled.compile_s or 0.0
        even = break_even_s(tps[False], tps[True], compile_s)
        detail = (
            f"{precision}: eager {tps[False]:,.0f} tok/s, compiled {tps[True]:,.0f} tok/s "
            f"({tps[True] / tps[False]:.2f}x), compile {compile_s:.1f} s, break-even "
            + ("never" if math.isinf(even) else f"{even:,.0f} s of eager steps")
        )
        out.append(Row("compile", f"{family} {method}", "ok", detail))
    return out


def run_bench(device: str, timeout: float = 900) -> list[Row]:
    """`nanotune bench --device DEVICE --quick` into a temporary report; its table in the row."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "BENCHMARKS.md"
        cmd = [sys.executable, "-m", "nanotune", "bench", "--device", device, "--quick"]
        cmd += ["--output", str(report)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [Row("bench", "bench --quick", "FAILED", f"past {timeout:.0f} s")]
        if done.returncode != 0 or not report.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()[-2:]
            return [Row("bench", "bench --quick", "FAILED", " | ".join(tail))]
        table = [ln for ln in report.read_text().splitlines() if ln.startswith("|")]
        return [
            Row("bench", "bench --quick", "ok", f"{len(table) - 2} rows"),
            *(Row("bench", "", "", ln) for ln in table),
        ]


def render(rows: list[Row], device: str, seconds: float) -> str:
    head = ("part", "check", "result", "detail")
    cells = [head] + [(r.part, r.what, r.result, r.detail) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [f"nanotune GPU check on {describe(device)} ({seconds:.0f} s)"]
    for i, c in enumerate(cells):
        lines.append("  ".join(c[j].ljust(widths[j]) for j in range(3)) + "  " + c[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def describe(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    from nanotune.hardware import cpu_model

    return cpu_model() if device == "cpu" else f"{device} (absent)"


def check(device: str, parts: tuple[str, ...] = PARTS) -> tuple[list[Row], bool]:
    """Run `parts` on `device`; (rows, whether every part that ran passed)."""
    missing = device_unavailable(device)
    rows: list[Row] = []
    for part in parts:
        if missing and part != "tests":  # the tests skip themselves, saying why
            rows.append(
                Row(
                    part,
                    {"compile": "compiled steps", "bench": "bench --quick"}[part],
                    "skipped",
                    missing,
                )
            )
            continue
        rows += {"tests": run_tests, "compile": compile_timing, "bench": run_bench}[part](device)
    return rows, not any(r.result == "FAILED" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nanotune.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated, from {', '.join(PARTS)} (default: all)",
    )
    args = p.parse_args(argv)
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    rows, ok = check(args.device, parts)
    print(render(rows, args.device, time.perf_counter() - start))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

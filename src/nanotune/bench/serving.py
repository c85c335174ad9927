"""The `serve` case: a load test of `nanotune serve` against `transformers serve` (the
transformers CLI's OpenAI-compatible server), same model folder, same requests, one run.

Each side's server runs in its own process on loopback; `CLIENTS` concurrent clients send
`REQUESTS` greedy chat completions of `MAX_TOKENS` tokens. Reported: generated tokens/s (from
each response's `usage`), p50/p95 latency, errors, and the server's memory: the sum of each
process's peak RSS over the server and its children (transformers 5.25 serves from a spawned
child process; reading the parent alone measured ~430 MiB for a ~7.8 GB server). Then, on
nanotune only, a queue overflow: twice `--max-queue` requests at once, RSS before and after
(memory stays bounded: the overflow gets 429, not a queue slot).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nanotune.bench.workload import OURS_COMPILED, NotApplicable

CLIENTS, REQUESTS, MAX_TOKENS = 16, 200, 32
QUICK_CLIENTS, QUICK_REQUESTS, QUICK_MAX_TOKENS = 4, 16, 8
# 200 different questions (a realistic chat load: the system prompt is shared, the question
# is not; repeating a few prompts would let nanotune's prefix cache skip whole prefills).
TEMPLATES = [
    "Tell me one fact about {}.",
    "Write one sentence about {}.",
    "Why do people like {}?",
    "What color is {}?",
    "Give me a tip about {}.",
    "How big is {}?",
    "Is {} useful? Answer briefly.",
    "Describe {} in three words.",
]
SUBJECTS = (
    "the sea, bees, bread, the moon, cats, trains, rain, music, coffee, mountains, paper, gold, "
    "snow, apples, books, bridges, clocks, dogs, forests, glass, honey, ice, kites, lamps, maps"
).split(", ")
QUESTIONS = [t.format(s) for s in SUBJECTS for t in TEMPLATES]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _tree_peak(pid: int) -> int:
    """A server's memory: the sum of each process's own peak RSS (VmHWM) over its process and
    every descendant (transformers serve runs its model in a spawned child). An upper bound
    of the tree's peak: the peaks may come at different times, and shared pages count once a
    process. A process or thread that exits while the tree is read counts 0."""
    try:
        total = _rss(pid, "VmHWM")
        children = [
            int(c)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return total + sum(_tree_peak(child) for child in children)


def hf_folder(source: Path, out: Path) -> Path:
    """The model as an HF folder both servers load (a .gguf is dequantized to float32 once)."""
    if source.is_dir():
        return source
    from nanotune.weights import load_model, save_model

    model, tokenizer = load_model(source)
    return save_model(model, tokenizer, out)


def _start(side: str, folder: Path, port: int, precision: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if side in ("nanotune", OURS_COMPILED):
        cmd = [
            sys.executable,
            "-m",
            "nanotune",
            "serve",
            "--model",
            str(folder),
            "--served-model-name",
            "m",
            "--port",
            str(port),
            "--max-batch",
            str(CLIENTS),
            "--dtype",
            precision,
            *(["--compile"] if side == OURS_COMPILED else []),
        ]
        model = "m"
    else:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [
            str(exe),
            "serve",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            precision,
            "--continuous-batching",
        ]
        model = str(folder)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return proc, model


async def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(1200):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"server exited: {err[-1] if err else proc.returncode}")
            try:
                if (await client.get(url + "/health", timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server never answered /health")


async def _load(url: str, model: str, clients: int, requests: int, max_tokens: int):
    """(latencies s, generated tokens, errors, wall s) of `requests` chat completions."""
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens, errors = 0, []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/chat/completions", json=body, timeout=600)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted, and the first few named in the note
                errors.append(f"{type(e).__name__}: {e}"[:120])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, tokens, errors, time.perf_counter() - t0


async def _overflow(url: str, model: str, pid: int, n: int) -> tuple[int, int, dict[int, int]]:
    """RSS before and after `n` simultaneous requests, and the status codes they got."""
    import httpx

    before = _rss(pid, "VmRSS")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 4,
        "temperature": 0,
    }
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as http:
        rs = await asyncio.gather(
            *(http.post(url + "/v1/chat/completions", json=body, timeout=600) for _ in range(n)),
            return_exceptions=True,
        )
    codes: dict[int, int] = {}
    for r in rs:
        code = r.status_code if not isinstance(r, Exception) else -1
        codes[code] = codes.get(code, 0) + 1
    return before, _rss(pid, "VmRSS"), codes


def measure(side: str, quick: bool, source: str | None, precision: str) -> dict[str, Any]:
    ours = side in ("nanotune", OURS_COMPILED)
    if not ours:
        exe = Path(sys.executable).with_name("transformers")
        try:
            import fastapi  # noqa: F401  (transformers serve needs it)
        except ImportError:
            raise NotApplicable("transformers serve needs fastapi: pip install fastapi") from None
        if not exe.is_file():
            raise NotApplicable("the transformers CLI is not installed")
    clients = QUICK_CLIENTS if quick else CLIENTS
    requests = QUICK_REQUESTS if quick else REQUESTS
    max_tokens = QUICK_MAX_TOKENS if quick else MAX_TOKENS
    with tempfile.TemporaryDirectory(prefix="nanotune-serve-bench-") as tmp:
        folder = hf_folder(Path(source), Path(tmp) / "model")
        port = _free_port()
        proc, model = _start(side, folder, port, precision)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(_wait_ready(url, proc))
            asyncio.run(_load(url, model, 2, 4, 4))  # warm-up: load, first allocations
            compiled = {}
            if side == OURS_COMPILED:  # the load's batch sizes compile their graphs here
                warm = [asyncio.run(_load(url, model, clients, clients, max_tokens))[3]]
                warm.append(asyncio.run(_load(url, model, clients, clients, max_tokens))[3])
                compiled = {"compile_s": max(0.0, warm[0] - warm[1])}
            lat, tokens, errors, wall = asyncio.run(
                _load(url, model, clients, requests, max_tokens)
            )
            # The whole server process: each side's cache schemes allocate at different times
            # (nanotune's grows with the batch and is freed when idle; the peer's is reserved).
            peak = _tree_peak(proc.pid)
            note = ""
            if ours:
                before, after, codes = asyncio.run(_overflow(url, model, proc.pid, 2 * 256 + 64))
                note = (
                    f"; queue overflow ({2 * 256 + 64} at once, --max-queue 256): "
                    + ", ".join(f"{c}×{k}" for k, c in sorted(codes.items()))
                    + f", RSS {before / 2**20:,.0f} → {after / 2**20:,.0f} MiB"
                )
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not lat:
        raise RuntimeError(f"every request failed: {errors[0] if errors else '?'}")
    p50 = statistics.median(lat)
    p95 = statistics.quantiles(lat, n=20)[-1] if len(lat) >= 2 else lat[0]
    return {
        **compiled,
        "ms_per_step": p50 * 1e3,
        "useful_per_s": tokens / wall,
        "flops_per_s": 0.0,
        "peak_bytes": peak,
        "peak_kind": "server memory: the sum of each process's peak RSS, children included",
        "steps": len(lat),
        "note": (
            f"{len(lat) + len(errors)} requests, {clients} clients, {len(errors)} errors"
            + (f" ({errors[0]})" if errors else "")
            + f", p50 {p50 * 1e3:,.0f} ms, p95 {p95 * 1e3:,.0f} ms"
            + f", {tokens} tokens in {wall:,.1f} s"
            + note
        ),
    }

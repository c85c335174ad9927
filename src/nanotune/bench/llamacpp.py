"""The llama.cpp peer of the decode-q8 cases: llama.cpp, through llama-cpp-python's C API, on
the SmolLM2 GGUF both sides load.

llama.cpp runs the file's own quantized weights (Q8_0) with its own CPU kernels, on as many
threads as torch uses here. A step decodes a batch of prompts the way llama.cpp's `batched`
example does: one context with a sequence per prompt, the prompts prefilled in one
`llama_decode`, then one `llama_decode` per new token for all sequences together; greedy (the
argmax of each sequence's logits), exactly `gen_new` tokens (an EOS does not stop it), the
KV cache cleared between steps.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from nanotune.bench.cases import Case, sizes
from nanotune.bench.workload import NotApplicable, Workload, how_it_ended


def gguf_precision(source: str | os.PathLike) -> str:
    """What llama.cpp computes in: the GGUF's quantization, from its file name (…Q4_1.gguf)."""
    kind = Path(source).stem.rsplit(".", 1)[-1]
    return f"GGUF {kind}" if kind != Path(source).stem else "GGUF"


def system_info(timeout: float = 120.0) -> str:
    """llama-cpp-python's version and llama.cpp's own line on what it was compiled with (CPU
    features such as AVX512 and AMX, which select its kernels), read in a fresh process: a build
    that crashes on this CPU must not take the bench down with it."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'nanotune[llama]')"
    version = f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"{version}; its system info timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        return f"{version}; its system info failed: {how_it_ended(proc)}"
    return f"{version}; `{' '.join(proc.stdout.split())}`"


def import_libraries(case: Case) -> None:
    """Import llama-cpp-python before the memory baseline (its shared library is ~10 MB)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise NotApplicable(
            "n/a: llama-cpp-python is not installed (pip install 'nanotune[llama]')"
        ) from e


def build(
    case: Case,
    quick: bool,
    device: str,
    items: list[Any],
    source: str | None,
    precision: str,
    compiled: bool = False,
) -> Workload:
    import llama_cpp as ll
    import numpy as np

    if device != "cpu":
        raise NotApplicable(f"n/a on {device}: the llama.cpp row is a CPU comparison")
    new, prompt, rows = sizes(quick).gen_new, len(items[0][0]), len(items[0])
    threads = torch.get_num_threads()
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(str(source).encode(), ll.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {source}")
    params = ll.llama_context_default_params()
    params.n_ctx = rows * (prompt + new + 8)
    params.n_batch = params.n_ubatch = rows * prompt
    params.n_seq_max = rows
    params.n_threads = params.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(rows * prompt, 0, rows)

    def fill(tokens: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) per batch entry."""
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, logits
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
        if ll.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(index: int) -> int:
        return int(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, index), (vocab,)).argmax())

    def run(item: list[list[int]]) -> list[list[int]]:
        """Greedy-decode the batch `item`; each prompt's new tokens."""
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)  # no earlier prompt is reused
        fill(
            [(t, i, s, i == len(ids) - 1) for s, ids in enumerate(item) for i, t in enumerate(ids)]
        )
        out: list[list[int]] = [[] for _ in item]
        last = [(s + 1) * prompt - 1 for s in range(rows)]  # each prompt's last token
        for t in range(new):
            for row, i in zip(out, last, strict=True):
                row.append(greedy(i))
            if t + 1 < new:
                fill([(row[-1], prompt + t, s, True) for s, row in enumerate(out)])
                last = list(range(rows))
        return out

    return Workload(run, items)

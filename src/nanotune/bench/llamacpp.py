"""The llama.cpp peer of the generate-llama-cpp case: llama-cpp-python on the SmolLM2 GGUF.

llama.cpp runs the file's own quantized weights (Q4_1 for the embedded SmolLM2) with its own
CPU kernels, on as many threads as torch uses here; greedy (top-k 1), the prompt's token ids as
given, exactly `gen_new` tokens (an EOS does not stop it), the KV cache cleared per prompt.
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
    case: Case, quick: bool, device: str, items: list[Any], source: str | None, precision: str
) -> Workload:
    import llama_cpp

    if device != "cpu":
        raise NotApplicable(f"n/a on {device}: the llama.cpp row is a CPU comparison")
    new, prompt = sizes(quick).gen_new, len(items[0][0])
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(
        model_path=str(source),
        n_ctx=prompt + new + 8,
        n_batch=prompt,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(item: list[list[int]]) -> None:
        (ids,) = item  # batch 1
        llm.reset()  # no prefix of an earlier prompt is reused
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if i + 1 == new:
                break

    return Workload(run, items)

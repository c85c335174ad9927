"""What `nanotune bench` takes (torch-free: the CLI's parser reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class BenchCommand:
    """time nanotune against transformers + peft; write BENCHMARKS.md"""

    quick: bool = False
    """Tiny shapes: a smoke test in seconds."""
    cases: str | None = None
    """Comma-separated case names (default: all)."""
    output: str = "BENCHMARKS.md"
    """Markdown report to write."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where both sides run."""

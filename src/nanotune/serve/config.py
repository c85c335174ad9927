"""What `nanotune serve` takes (torch-free: the CLI's parser reads it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nanotune.errors import NanotuneError
from nanotune.models.decoding import DecodeDtype
from nanotune.serve.limits import MAX_BATCH, MAX_BODY, MAX_QUEUE, PREFIX_CACHE_MB

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeCommand:
    """an OpenAI-compatible HTTP server for a model and its LoRA adapters

    Serve a base model and any number of its LoRA adapters over the OpenAI API
    (/v1/completions, /v1/chat/completions, /v1/models), batching requests for different
    adapters together. Needs the 'serve' extra. Requests pick an adapter by its NAME in the
    `model` field; the base answers to its own name."""

    model: str | None = None
    """Base model: name, folder, .gguf, or a LoRA run's final/ (served with its base)
    (default: the embedded SmolLM2)."""
    adapter: tuple[str, ...] = ()
    """A LoRA adapter folder (a run's final/) served as model NAME, given as NAME=DIR (a bare
    DIR is named after its run); repeatable."""
    served_model_name: str | None = None
    """The base model's name in the API (default: --model as given)."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback: this machine only)."""
    port: int = 8000
    """Port (0: any free one)."""
    api_key: str | None = field(default_factory=lambda: os.environ.get("NANOTUNE_API_KEY"))
    """Require 'Authorization: Bearer KEY' (default: $NANOTUNE_API_KEY, else none); a key
    given here shows in the process list (ps), set NANOTUNE_API_KEY to keep it out."""
    dtype: DecodeDtype = "float32"
    """Weights while decoding: bfloat16 halves the bytes a decode step streams, int8 quarters
    the linear weights' (base only: adapters cannot attach to int8 layers); answers are then
    no longer bit-equal to float32's."""
    max_batch: int = MAX_BATCH
    """Sequences decoded together."""
    compile: bool = False
    """Decode through torch.compile: a graph per batch bucket (powers of two up to
    --max-batch), each compiled on first use (tens of seconds on a CPU), CUDA graphs on a GPU.
    Steps that carry a joining prompt or adapter rows run eager, on bf16 weights left unpacked:
    on a CPU it pays for long answers at a steady batch, not for many short chats (measured
    0.54x eager on the bench's chat load, benchmarks/NOTES.md)."""
    max_queue: int = MAX_QUEUE
    """Sequences waiting before new requests get 429."""
    max_body_kb: int = MAX_BODY // 1024
    """Largest request body in KiB (413 above)."""
    prefix_cache_mb: int = PREFIX_CACHE_MB
    """Keys/values of recent prompts kept so a prompt that starts the same way (system prompt,
    few-shot context) prefills only the rest; 0 = off."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_kb"):
            if getattr(self, name) < 1:
                raise NanotuneError(f"--{name.replace('_', '-')} must be at least 1")
        if self.prefix_cache_mb < 0:
            raise NanotuneError("--prefix-cache-mb must be 0 (off) or more")
        if not 0 <= self.port < 65536:
            raise NanotuneError(f"--port {self.port}: give 0 (any free port) to 65535")
        self.api_key = self.api_key or None

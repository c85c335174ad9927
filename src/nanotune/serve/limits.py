"""What a server takes on by default: `nanotune serve`'s limits, read by the CLI, `serve()`,
the engine and the app (torch-free, so the CLI's parser stays light)."""

from __future__ import annotations

MAX_BATCH = 16  # sequences decoded together
MAX_QUEUE = 256  # requests waiting before new ones get 429
PREFIX_CACHE_MB = 256  # keys/values of recent prompts kept for prompts that start the same way
MAX_BODY = 1 << 20  # bytes; a request body past this is refused (413)

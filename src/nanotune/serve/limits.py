"""What a server takes on by default: `nanotune serve`'s limits, read by the CLI, `serve()` and
the app (torch-free, so the CLI's parser stays light). The engine's own live in decoding.limits."""

from __future__ import annotations

from nanotune.decoding.limits import MAX_BATCH, MAX_QUEUE, PREFIX_CACHE_MB

__all__ = ["MAX_BATCH", "MAX_BODY", "MAX_QUEUE", "PREFIX_CACHE_MB"]

MAX_BODY = 1 << 20  # bytes; a request body past this is refused (413)

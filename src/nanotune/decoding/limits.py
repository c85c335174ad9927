"""What the decoding engine takes on by default (torch-free, so the CLI's parser stays light)."""

from __future__ import annotations

MAX_BATCH = 16  # sequences decoded together
MAX_QUEUE = 256  # sequences waiting before new ones are refused
PREFIX_CACHE_MB = 256  # keys/values of recent prompts kept for prompts that start the same way

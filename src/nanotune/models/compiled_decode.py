"""A decode step (one new token per row) through torch.compile, on static shapes.

Eager decoding runs hundreds of small ops per token, each dispatched alone; compiled, a step is
one graph. That needs shapes that do not change from token to token: the KV cache is read whole
(its `max_len` columns, those not written yet masked out), the new keys and values are written
at a column given as a tensor, and positions and masks are tensors too. So one graph serves
every step of a generation, and every generation with the same batch size and cache length:
`cache_len` rounds the cache up to a multiple of CACHE_BUCKET columns.

The prompt (prefill) stays eager: its length differs per call and it runs once.

Sliding-window layers keep a ring of their window's columns (`KVCache`), read whole each step
too: a model with a window of 512 attends over 512 columns there, however long the generation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nanotune.models.transformer import KVCache, sliding_mask

CACHE_BUCKET = 128
"""Cache lengths are rounded up to a multiple of this: generations of nearby lengths share a
graph, at the price of attending over at most this many masked columns more."""


def cache_len(needed: int, block_size: int) -> int:
    """The cache length a compiled decode allocates for `needed` tokens (prompt + new)."""
    return min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, block_size)


class _StaticCache:
    """The blocks' view of a KVCache during a compiled step: the new key and value go to column
    `slot` (a tensor; in a sliding-window layer's ring, column slot % ring) and attention reads
    every column (every ring column: those holding no key, or one out of the window, masked)."""

    def __init__(self, cache: KVCache, slot: Tensor) -> None:
        self.k, self.v, self.slot = cache.k, cache.v, slot
        self.windowed, self.key_pos = cache.windowed, cache.key_pos
        self.ring_slot = slot % cache.ring if cache.ring else None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        at = self.ring_slot if self.windowed[layer] else self.slot
        self.k[layer].index_copy_(2, at, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, at, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


def _step(
    model: nn.Module, view: _StaticCache, tokens: Tensor, positions: Tensor, keys: Tensor
) -> Tensor:
    """Final-normed hidden states [B, 1, C] of `tokens` [B, 1] at `positions` [B, 1]; keys
    [B, L]: 1 where a cache column holds a real token (left padding 0). Columns past
    `view.slot` are masked too."""
    L = keys.shape[1]
    cols = torch.arange(L, device=tokens.device)
    allowed = keys.bool() & (cols <= view.slot)[None, :]  # [B, L]
    mask = allowed[:, None, None, :]
    window_mask = None
    if view.key_pos is not None:  # the rings: the new key's position recorded, then read whole
        view.key_pos.index_copy_(1, view.ring_slot, positions)
        window_mask = sliding_mask(positions, view.key_pos, model.config.sliding_window)
    x, rope = model.embed(tokens, positions)
    x = model.run_blocks(x, rope, mask, view, range(len(model.blocks)), window_mask=window_mask)
    return model.norm(x)


class CompiledDecoder:
    """Decode steps of `model` through one compiled graph per (batch size, cache length)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._compiled = torch.compile(_step, dynamic=False)

    def hidden(
        self,
        tokens: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache,
    ) -> Tensor:
        """`model.hidden(tokens, positions=, attention_mask=, cache=)`: compiled for one token
        per row, eager for more (a prompt); advances `cache.length` alike."""
        if tokens.shape[1] != 1:
            return self.model.hidden(
                tokens, positions=positions, attention_mask=attention_mask, cache=cache
            )
        mask = attention_mask
        B, L = tokens.shape[0], cache.max_len
        if cache.length >= L:
            raise ValueError(f"sequence of {cache.length + 1} tokens exceeds the cache ({L})")
        slot = torch.tensor([cache.length], device=tokens.device)
        if positions is None:
            positions = slot.expand(B, 1)
        if mask is None:
            keys = torch.ones((B, L), dtype=torch.long, device=tokens.device)
        else:  # the caller's mask may be longer than the cache (it is read up to L)
            keys = mask[:, :L]
            if keys.shape[1] < L:  # columns past the caller's mask: never written, so masked
                keys = torch.nn.functional.pad(keys, (0, L - keys.shape[1]))
        # Contiguous: a stride differing between calls (an expanded tensor, a slice of a wider
        # mask) would be a graph of its own.
        positions, keys = positions.contiguous(), keys.contiguous()
        h = self._compiled(self.model, _StaticCache(cache, slot), tokens, positions, keys)
        cache.length += 1
        return h

"""A decode step (one new token per row) through torch.compile, on static shapes.

Eager decoding runs hundreds of small ops per token, each dispatched alone; compiled, a step is
one graph. That needs shapes that do not change from token to token: each row's KV cache is
read whole (the columns holding no key of it masked out), the new key and value are written at
a column given as a tensor, and positions and masks are tensors too.

The cache's length is a dynamic dimension (a symbol in the graph), the batch a static one:
- `generate --compile` (and chat): one cache per call, as long as the prompt and the new
  tokens, every row writing the same column. A graph per batch size, whatever the lengths.
- The serve and GRPO engine (`decoding.engine`): rows are the first `batch_bucket(n)` slots of
  its slot cache, each writing its own position; rows past the n live ones are free slots whose
  keys nobody reads. The batch is bucketed (powers of two), so an engine compiles one graph per
  bucket, a handful (`torch._dynamo`'s recompile limit is 8).

On CUDA the step runs as a CUDA graph (`mode="reduce-overhead"`): one launch per token instead
of one per kernel; the cache tensors are marked static addresses, so the graph writes them in
place.

The prompt (prefill) stays eager: its length differs per call and it runs once.

Sliding-window layers keep a ring of their window's columns (`KVCache`), read whole each step
too: a model with a window of 512 attends over 512 columns there, however long the generation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nanotune.models.transformer import KVCache, sliding_mask


def batch_bucket(rows: int, most: int) -> int:
    """The batch a compiled engine step runs for `rows` live rows: the next power of two, at
    most `most` (the engine's max batch, itself a bucket)."""
    return min(1 << (rows - 1).bit_length(), most)


class StaticCache:
    """The blocks' view of a cache during a compiled step. Row r of `k[layer]`, `v[layer]`
    [B, heads, columns, head dim] takes its new key and value at column `cols[r]` (in a
    sliding-window layer's ring, `cols[r] % ring`, its position recorded in `key_pos`
    [B, ring]); attention reads every column."""

    def __init__(
        self,
        k: list[Tensor],
        v: list[Tensor],
        windowed: list[bool],
        ring: int,
        key_pos: Tensor | None,
        cols: Tensor,
    ) -> None:
        self.k, self.v, self.windowed, self.key_pos, self.cols = k, v, windowed, key_pos, cols
        self.ring_cols = cols % ring if ring else None
        if cols.is_cuda:  # a CUDA graph writes them in place (else it is skipped, not wrong)
            for t in (*k, *v, *([] if key_pos is None else [key_pos])):
                torch._dynamo.mark_static_address(t)

    @classmethod
    def of(cls, cache: KVCache, cols: Tensor) -> StaticCache:
        return cls(cache.k, cache.v, cache.windowed, cache.ring, cache.key_pos, cols)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        K, V = self.k[layer], self.v[layer]
        at = self.ring_cols if self.windowed[layer] else self.cols
        B, H, L, D = K.shape
        # Row r, head h, column at[r] of K flattened to [B * H * L, D]: one index_copy_.
        flat = (
            (torch.arange(B, device=at.device)[:, None] * H + torch.arange(H, device=at.device)) * L
            + at[:, None]
        ).view(-1)
        K.view(-1, D).index_copy_(0, flat, k.reshape(-1, D).to(K.dtype))
        V.view(-1, D).index_copy_(0, flat, v.reshape(-1, D).to(V.dtype))
        return K, V


def _step(
    model: nn.Module,
    view: StaticCache,
    tokens: Tensor,
    positions: Tensor,
    keys: Tensor,
    long_rope: Tensor | None,
) -> Tensor:
    """Final-normed hidden states [B, 1, C] of `tokens` [B, 1] at `positions` [B, 1]; keys
    [B, L]: 1 where a cache column may hold a real token (left padding 0); columns past each
    row's `view.cols` are masked too."""
    L = keys.shape[1]
    columns = torch.arange(L, device=tokens.device)
    allowed = keys.bool() & (columns[None, :] <= view.cols[:, None])  # [B, L]
    mask = allowed[:, None, None, :]
    window_mask = None
    if view.key_pos is not None:  # the rings: the new key's position recorded, then read whole
        B, ring = view.key_pos.shape
        flat = torch.arange(B, device=tokens.device) * ring + view.ring_cols
        view.key_pos.view(-1).index_copy_(0, flat, positions[:, 0])
        window_mask = sliding_mask(positions, view.key_pos, model.config.sliding_window)
    x, rope = model.embed(tokens, positions, long_rope)
    x = model.run_blocks(x, rope, mask, view, range(len(model.blocks)), window_mask=window_mask)
    return model.norm(x)


def _compile_step(device: torch.device):
    if device.type == "cuda":  # as CUDA graphs: one launch per step
        return torch.compile(_step, dynamic=False, mode="reduce-overhead")
    return torch.compile(_step, dynamic=False)


class CompiledDecoder:
    """Decode steps of `model` through compiled graphs (see the module's docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._compiled = _compile_step(next(model.parameters()).device)

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
        cols = torch.full((B,), cache.length, device=tokens.device)
        if positions is None:
            positions = cols[:, None]
        if all(cache.windowed):  # keys are read by global layers only: a stand-in of a ring's
            keys = torch.ones((B, cache.ring), dtype=torch.long, device=tokens.device)
        elif mask is None:
            keys = torch.ones((B, L), dtype=torch.long, device=tokens.device)
        else:  # the caller's mask may be longer than the cache (it is read up to L)
            keys = mask[:, :L]
            if keys.shape[1] < L:  # columns past the caller's mask: never written, so masked
                keys = torch.nn.functional.pad(keys, (0, L - keys.shape[1]))
        # Contiguous: a stride differing between calls (an expanded tensor, a slice of a wider
        # mask) would be a graph of its own.
        positions, keys = positions.contiguous(), keys.contiguous()
        view = StaticCache.of(cache, cols)
        _dynamic_length(view, keys)
        h = self._compiled(self.model, view, tokens, positions, keys, None)
        cache.length += 1
        return h

    def step(
        self,
        view: StaticCache,
        tokens: Tensor,
        positions: Tensor,
        long_rope: Tensor | None = None,
    ) -> Tensor:
        """One engine step: `tokens`, `positions` [B, 1] written at `view.cols` (= positions)
        of rows 0..B-1 of `view`'s tensors, each row attending over its columns up to there.
        The cache's length (the columns of its non-ring layers) is a dynamic dimension."""
        full = [t for t, w in zip(view.k, view.windowed, strict=True) if not w]
        L = full[0].shape[2] if full else view.key_pos.shape[1]
        keys = torch.ones((tokens.shape[0], L), dtype=torch.long, device=tokens.device)
        _dynamic_length(view, keys)
        return self._compiled(self.model, view, tokens, positions, keys, long_rope)


def _dynamic_length(view: StaticCache, keys: Tensor) -> None:
    """Trace the cache's lengths as symbols (every layer's columns, the rings' included: a ring
    is as long as a generation shorter than its window), so caches of any length share a
    graph."""
    for t in (*view.k, *view.v):
        torch._dynamo.mark_dynamic(t, 2)
    if view.key_pos is not None:
        torch._dynamo.mark_dynamic(view.key_pos, 1)
    torch._dynamo.mark_dynamic(keys, 1)

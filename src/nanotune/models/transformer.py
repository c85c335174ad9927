"""One decoder for the GPT-2 and Llama families (and Llama's kin: Qwen2, Qwen3, Mistral, SmolLM3,
Gemma 2, Gemma 3 and Phi-3; and GPT-NeoX, GPT-2's layers with RoPE and a parallel residual).

Shapes: B batch, T new tokens, S keys (cache + new), C n_embd, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nanotune.models.config import ModelConfig
from nanotune.models.linear import Linear

RoPE = tuple[Tensor, Tensor] | None
"""Rotary angles (cos, sin), each [B, 1, T, D] ([2, B, 1, T, D] where the sliding layers have
their own base: global, local), or None for learned positions."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype and x.dtype.itemsize >= 4:  # fp32, fp64: one kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Half precision: normalise in fp32, as Llama does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RMSNormPlusOne(nn.Module):
    """Gemma's RMSNorm: x * (1 + w), in float32 whatever the input (cast back after the scale),
    its weight stored zero-centred as the checkpoints hold it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        norm = RMSNormPlusOne if config.norm_plus_one else RMSNorm
        return norm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def soft_cap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap): Gemma 2's bound on attention and output logits."""
    return torch.tanh(x / cap) * cap


def _cap_logits(cap: float, head: nn.Module, inputs: tuple, logits: Tensor) -> Tensor:
    """The output head's forward hook where the config soft-caps final logits: every caller of
    `lm_head` (training, evaluation, decoding) gets capped logits, and a layer replacing the
    head for decoding (`linear.pack_bf16`, `quantize_int8`) takes the hook along."""
    return soft_cap(logits, cap)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """[R/2] inverse frequencies (R: the rotary dims, D unless partial), or [2, R/2] (global,
    local) where the sliding layers have a base of their own (Gemma 3: scaling applies to the
    global layers only). Longrope: the short factors' (see `rope_buffers`)."""
    inv_freq = _scaled(_inv_freq(config.rope_theta, config.rotary_dim), config)
    if config.rope_local_theta is None:
        return inv_freq
    return torch.stack([inv_freq, _inv_freq(config.rope_local_theta, config.rotary_dim).float()])


def rope_buffers(config: ModelConfig) -> dict[str, Tensor]:
    """The rotary buffers a RoPE model holds: `inv_freq`, and for longrope (Phi-3) also
    `long_inv_freq`, the frequencies past the original context."""
    buffers = {"inv_freq": rope_inv_freq(config)}
    if longrope(config) is not None:
        long = _scaled(_inv_freq(config.rope_theta, config.rotary_dim), config, long=True)
        buffers["long_inv_freq"] = long
    return buffers


def longrope(config: ModelConfig) -> tuple[int, float] | None:
    """(original context, attention factor) of a longrope config (Phi-3's su/longrope), else None.

    As transformers computes it: the factor is the config's, else context / original context,
    and the attention factor (cos and sin are scaled by it) the config's, else
    sqrt(1 + ln(factor) / ln(original context)) when the factor exceeds 1."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return None
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.block_size / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return original, float(attention)


def _inv_freq(theta: float, d: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


def _scaled(inv_freq: Tensor, config: ModelConfig, long: bool = False) -> Tensor:
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        # Llama 3.1+: stretch long wavelengths, keep short ones, blend in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, blended, inv_freq)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind in ("longrope", "su"):
        # Phi-3: each frequency divided by its own factor, long ones past the original context.
        factors = scaling["long_factor" if long else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + R/2): the Hugging Face Llama layout. x: [B, H, T, D]; cos, sin
    [..., R]: with R < D (partial rotary: Phi-3 variants, GPT-NeoX) the first R dims turn, the
    rest pass as they are."""
    r = cos.shape[-1]
    if r != x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


NO_KEY = -(2**31)
"""The position `KVCache.key_pos` records for a ring slot that holds no key (empty, or padding):
further back than any window from every query."""


class KVCache:
    """Preallocated keys and values for every layer; `length` columns are filled (left padding
    included).

    A sliding-window layer keeps a ring of `ring` columns (its window, at most `max_len`) instead
    of `max_len`: the key of column c sits at c % ring, over the key `ring` columns back, which no
    later query sees (a query sees `window` keys: itself and the ones before). Keys are kept
    after RoPE with their positions (`key_pos` [B, ring], NO_KEY where none), so the window mask
    is exact whatever the order of the ring. Global layers keep every column.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.windowed = [config.window(i) is not None for i in range(config.n_layer)]
        self.window = config.sliding_window
        self.ring = min(self.window, max_len) if any(self.windowed) else 0

        def columns(layer: int) -> tuple[int, ...]:
            n = self.ring if self.windowed[layer] else max_len
            return (batch_size, config.kv_heads, n, config.hd)

        n_layer = config.n_layer
        self.k = [torch.zeros(columns(i), device=device, dtype=dtype) for i in range(n_layer)]
        self.v = [torch.zeros(columns(i), device=device, dtype=dtype) for i in range(n_layer)]
        self.key_pos: Tensor | None = None
        if self.ring:
            self.key_pos = torch.full((batch_size, self.ring), NO_KEY, device=device)
        self.max_len = max_len
        self.length = 0
        # This forward's ring columns, and how many ring columns its keys follow (None: the
        # ring is written first and read whole).
        self._write: tuple[Tensor, int | None] | None = None

    def reset(self) -> None:
        """Empty, to be filled again from column 0."""
        self.length = 0
        if self.key_pos is not None:
            self.key_pos.fill_(NO_KEY)

    def window_keys(self, positions: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """The positions [B, S] of the keys the sliding-window layers attend over in a forward
        of new tokens at `positions` [B, T] (attention_mask: [B, >= length + T], 0 at padding),
        recorded in `key_pos`; None where plain causal attention over the new keys is exact
        (nothing cached, no padding, no key out of the window).

        One new token a row (decode): its key is written first and the ring read (up to its
        last filled column). More (a prompt or a chunk of one): the ring as it was (its filled
        columns), then the new keys, the last `ring` of which it keeps."""
        if not self.ring:
            return None
        B, T = positions.shape
        start, R = self.length, self.ring
        cols = torch.arange(start, start + T, device=positions.device)
        pos = positions
        if attention_mask is not None:
            pos = positions.masked_fill(attention_mask[:, start : start + T] == 0, NO_KEY)
        if T == 1:
            slots = cols % R
            self.key_pos.index_copy_(1, slots, pos)
            self._write = slots, None
            return self.key_pos[:, : min(start + 1, R)]
        filled = min(start, R)
        keys = torch.cat((self.key_pos[:, :filled], pos), dim=1)
        keep = min(T, R)
        self.key_pos.index_copy_(1, cols[T - keep :] % R, pos[:, T - keep :])
        self._write = cols[T - keep :] % R, filled
        if filled == 0 and attention_mask is None and T <= self.window:
            return None
        return keys

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        K, V = self.k[layer], self.v[layer]
        if self.windowed[layer]:
            return self._update_ring(K, V, k.to(K.dtype), v.to(V.dtype))
        start, end = self.length, self.length + k.shape[2]
        K[:, :, start:end] = k
        V[:, :, start:end] = v
        return K[:, :, :end], V[:, :, :end]

    def _update_ring(self, K: Tensor, V: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        slots, filled = self._write
        if filled is None:
            K.index_copy_(2, slots, k)
            V.index_copy_(2, slots, v)
            n = min(self.length + 1, self.ring)
            return K[:, :, :n], V[:, :, :n]
        keys = torch.cat((K[:, :, :filled], k), dim=2)
        values = torch.cat((V[:, :, :filled], v), dim=2)
        keep = slots.shape[0]
        K.index_copy_(2, slots, k[:, :, -keep:])
        V.index_copy_(2, slots, v[:, :, -keep:])
        return keys, values


def sliding_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """[B, 1, T, S]: where queries at `q_pos` [B, T] see keys at `k_pos` [B, S] (a cache's,
    in any order): at or before the query, less than `window` positions back (NO_KEY: never)."""
    d = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    return (d >= 0) & (d < window)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        qkv_out = (config.n_head + 2 * config.kv_heads) * config.hd
        self.qkv = Linear(config.n_embd, qkv_out, bias=config.has_qkv_bias)
        self.proj = Linear(config.n_head * config.hd, config.n_embd, bias=config.attn_bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, config.hd)
            self.k_norm = make_norm(config, config.hd)
        self.qk_norm = config.qk_norm
        self.use_rope = layer not in config.nope_layers
        self.window = config.window(layer)
        # Which angles of a two-base RoPE this layer takes: 1 (local) where it slides.
        self.rope_index = None
        if config.rope_local_theta is not None:
            self.rope_index = int(self.window is not None)
        self.scale = None  # None: SDPA's 1/sqrt(head dim)
        if config.query_pre_attn_scalar is not None:
            self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_softcap
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
        query_at: Tensor | None = None,
    ) -> Tensor:
        """[B, T, C]; with query_at [B] (and no mask or cache), only the output at that index of
        each row, [B, 1, C]: keys and values come from every position, the query from one."""
        B, T, _ = x.shape
        H, K, D = self.config.n_head, self.config.kv_heads, self.config.hd
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)
        if query_at is not None:
            q = q[torch.arange(B, device=q.device), query_at][:, None]
        q = q.view(B, q.shape[1], H, D).transpose(1, 2)
        k = k.view(B, T, K, D).transpose(1, 2)
        v = v.view(B, T, K, D).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and self.use_rope:
            cos, sin = rope
            if self.rope_index is not None:
                cos, sin = cos[self.rope_index], sin[self.rope_index]
            k = apply_rope(k, cos, sin)
            if query_at is not None:  # the angles of each row's query position: [B, 1, 1, D]
                rows = torch.arange(B, device=q.device)
                cos, sin = cos[rows, :, query_at][:, :, None], sin[rows, :, query_at][:, :, None]
            q = apply_rope(q, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Grouped-query attention (each kv head serves H // K query heads): the CPU kernels
        # take it natively; elsewhere the fast kernels want the heads repeated.
        gqa = K != H and q.device.type == "cpu"
        if K != H and not gqa:
            k = k.repeat_interleave(H // K, dim=1)
            v = v.repeat_interleave(H // K, dim=1)
        p = self.dropout if self.training else 0.0
        if query_at is not None:  # causal: the query sees keys up to its own position
            keys = torch.arange(T, device=q.device)
            mask = keys <= query_at[:, None]
            if self.window is not None:
                mask = mask & (keys > query_at[:, None] - self.window)
            mask = mask[:, None, None, :]
        if self.softcap is not None:  # no fused kernel caps the scores: attend explicitly
            y = _attend_capped(q, k, v, mask, self.scale, self.softcap, p)
        elif mask is None:
            # Only reached without a cache offset, so plain causal attention is exact.
            # A Python branch, not `is_causal=T > 1`: under torch.compile with a dynamic length
            # that would be a symbolic bool, which SDPA refuses.
            causal = True if T > 1 else False  # noqa: SIM210
            y = _attend(q, k, v, dropout_p=p, is_causal=causal, enable_gqa=gqa, scale=self.scale)
        else:
            y = _attend(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], H * D))


def _attend(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """`F.scaled_dot_product_attention`, in float32 on CPU for bf16 inputs (autocast training or
    bf16/int8 decoding), back in the inputs' dtype: the bf16 CPU kernels are the slow ones, the
    backward ~3.4x (15.5 vs 4.6 ms per GPT-2 layer at 8 x 76 tokens), a decode step ~3x (166 vs
    58 us per GPT-2 layer at batch 1, 1119 vs 364 us at batch 8, upcasts included), for a product
    that is a small part of the FLOPs; the float32 softmax is also the more accurate."""
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _attend_capped(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, cap: float, p: float
) -> Tensor:
    """Attention with soft-capped scores (Gemma 2), in float32 as `_attend` on CPU; mask as
    `Attention.forward` passes it (None: plain causal, no cache offset)."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = soft_cap((q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5), cap)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    # A query with no key (a pad row) gets zeros, as from SDPA, not a NaN row that would reach
    # the real rows through its value at the same position.
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1).masked_fill(~mask, 0.0)
    weights = F.dropout(weights, p) if p else weights
    return (weights @ v).to(dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.geglu = config.mlp == "geglu"
        self.approximate = "none" if config.mlp == "gelu_exact" else "tanh"
        fc_out = 2 * config.ffn if self.swiglu or self.geglu else config.ffn
        self.fc = Linear(config.n_embd, fc_out, bias=config.mlp_bias)
        self.proj = Linear(config.ffn, config.n_embd, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        if self.geglu:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(F.gelu(gate, approximate="tanh") * up)
        return self.proj(F.gelu(h, approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.post_norms = config.post_norms
        self.parallel_residual = config.parallel_residual
        if config.post_norms:  # Gemma: each sublayer's output normed before the residual
            self.post_attn_norm = make_norm(config)
            self.post_mlp_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
        query_at: Tensor | None = None,
    ) -> Tensor:
        """[B, T, C]; with query_at [B], the output at that index of each row only, [B, C]
        (see `Attention.forward`): the MLP then runs on B positions instead of B x T."""
        y = self.attn(self.norm1(x), rope, mask, cache, layer, query_at)
        if query_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), query_at][:, None]
        if self.parallel_residual:  # GPT-NeoX: the MLP reads the block's input, not x + y
            x = x + self.drop(y) + self.drop(self.mlp(self.norm2(x)))
        elif self.post_norms:
            x = x + self.drop(self.post_attn_norm(y))
            x = x + self.drop(self.post_mlp_norm(self.mlp(self.norm2(x))))
        else:
            x = x + self.drop(y)
            x = x + self.drop(self.mlp(self.norm2(x)))
        return x[:, 0] if query_at is not None else x


class Transformer(nn.Module):
    """Decoder-only language model. `hidden()` gives final-normed states; `lm_head` maps to logits.

    Keeping the two apart lets training apply the head only where labels are.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd)
            if config.positions == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._cap_head()
        self.longrope = longrope(config) if config.positions == "rope" else None
        if config.positions == "rope":
            for name, buffer in rope_buffers(config).items():
                self.register_buffer(name, buffer, persistent=False)
        self.gradient_checkpointing = False
        self._compiled_blocks: list[nn.Module] | None = None
        self.apply(self._init_weights)

    def compile_blocks(self, enable: bool = True, *, dynamic: bool | None = True) -> None:
        """Run each block through `torch.compile` (inductor) wherever gradients are recorded and
        there is no KV cache: the training forward and its backward. Evaluation, scoring under
        no_grad and decoding stay eager, so they never wait for a compile of their own.

        Blocks of one shape share one compiled graph (their weights are its inputs), so the
        compile time does not grow with depth; the first block is a second graph where the
        embeddings are frozen (LoRA: its input needs no gradient). dynamic=True traces the
        sequence length and batch as symbols: one compile serves every length (see
        benchmarks/NOTES.md for the measured choice against bucketed static shapes); a batch of
        one row or one token among larger ones adds a graph (torch specialises sizes 0 and 1).
        enable=False goes back to eager.
        """
        if not enable:
            self._compiled_blocks = None
            return
        self._compiled_blocks = [torch.compile(b, dynamic=dynamic) for b in self.blocks]

    def _cap_head(self) -> None:
        if self.config.final_softcap is not None:
            self.lm_head.register_forward_hook(partial(_cap_logits, self.config.final_softcap))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def cache_dtype(self) -> torch.dtype:
        """What the KV cache holds: the weights' dtype, except float32 for bfloat16 weights on
        CPU, where `_attend` multiplies in float32 anyway: each new key and value is then cast
        once, not the whole cache at every step (the same values, so the same outputs)."""
        dtype = self.wte.weight.dtype
        return torch.float32 if dtype == torch.bfloat16 and self.device.type == "cpu" else dtype

    def init_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        max_len = min(max_len, self.config.block_size)
        return KVCache(self.config, batch_size, max_len, self.device, dtype or self.cache_dtype)

    def hidden(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        branch_ids: Tensor | None = None,
        cache: KVCache | None = None,
        long_rope: Tensor | None = None,
    ) -> Tensor:
        """Final-normed hidden states [B, T, C].

        positions: [B, T] absolute positions (default: cache length + 0..T-1). Left-padded
            batches and packed sequences pass their own.
        attention_mask: [B, S] 1 where a key is a real token, 0 for padding (S = cache + T).
        doc_ids: [B, T] packed-document ids; attention never crosses documents.
        branch_ids: [B, T] continuations sharing a prefix in one row: a token of branch n > 0
            attends to branch 0 (the shared prefix) and to its own branch only, so a prompt
            followed by several responses computes the prompt once (positions restart each
            branch where the prefix ends).
        long_rope: [B] bool, longrope models (Phi-3): the rows turned by the long factors,
            where a row's positions here do not say it (default: those reaching the original
            context): a sequence computed in several forwards (chunks, a row per token) turns
            by the factors of its whole length, as when computed in one.
        """
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if cache is not None and offset + T > cache.max_len:
            raise ValueError(f"sequence of {offset + T} tokens exceeds the cache ({cache.max_len})")
        if positions is None:
            positions = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        x, rope = self.embed(input_ids, positions, long_rope)
        layout = (B, T, offset, attention_mask, doc_ids, branch_ids, input_ids.device)
        mask = self._mask(*layout)
        window_mask = None
        window = self.config.sliding_window
        if window is not None and cache is not None:  # the keys the cache's rings hold
            key_pos = cache.window_keys(positions, attention_mask)
            if key_pos is not None:
                window_mask = sliding_mask(positions, key_pos, window)
        elif window is not None:
            window_mask = self._mask(*layout, positions, window)
        x = self.run_blocks(x, rope, mask, cache, range(len(self.blocks)), window_mask=window_mask)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def embed(
        self, input_ids: Tensor, positions: Tensor, long_rope: Tensor | None = None
    ) -> tuple[Tensor, RoPE]:
        """The input to block 0 [B, T, C], and the rotary angles every block uses (RoPE models;
        long_rope: see `hidden`)."""
        x = self.wte(input_ids)
        if self.config.embed_scale:  # the scale rounded to the table's dtype, as Gemma does
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        rope = self.rope(positions, x.dtype, long_rope)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        return self.drop(x), rope

    def rope(self, positions: Tensor, dtype: torch.dtype, long: Tensor | None = None) -> RoPE:
        """cos, sin [B, 1, T, D] of `positions` [B, T]; None for learned positions."""
        if self.wpe is not None:
            return None
        if self.longrope is not None:
            return self._longrope(positions, dtype, long)
        if self.inv_freq.dim() == 2:  # global and local bases: [2, B, 1, T, D/2]
            angles = positions[None, :, None, :, None].float() * self.inv_freq[:, None, None, None]
        else:
            angles = positions[:, None, :, None].float() * self.inv_freq  # [B, 1, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _longrope(
        self, positions: Tensor, dtype: torch.dtype, long: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Phi-3's longrope: a row whose furthest position reaches past the original context
        turns by the long factors, else by the short ones, as transformers chooses per forward
        (by the whole batch's furthest position there; per row here, so that rows batched
        together compute what each computes alone), or as `long` [B] says; cos and sin scaled
        by the attention factor."""
        original, attention = self.longrope
        if long is None:
            long = positions.amax(-1) >= original
        long = long[:, None, None, None]  # [B, 1, 1, 1]
        inv_freq = torch.where(long, self.long_inv_freq, self.inv_freq)  # [B, 1, 1, D/2]
        angles = positions[:, None, :, None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * attention).to(dtype), (angles.sin() * attention).to(dtype)

    def run_blocks(
        self,
        x: Tensor,
        rope: RoPE,
        mask: Tensor | None,
        cache: KVCache | None,
        layers: range,
        query_at: Tensor | None = None,
        window_mask: Tensor | None = None,
    ) -> Tensor:
        """Blocks `layers` over x [B, T, C]; query_at [B] (no mask or cache): the last of them
        computes only the state at that index of each row, and [B, C] comes back.

        mask: what every layer sees (None: plain causal); window_mask: what sliding-window
        layers see instead (None: no key is out of the window, or, with mask and cache None,
        plain causal within the window, built here)."""
        window = self.config.sliding_window
        if window is not None and mask is None and cache is None and window_mask is None:
            B, T = x.shape[:2]
            positions = torch.arange(T, device=x.device).expand(B, T)
            window_mask = self._mask(B, T, 0, None, None, None, x.device, positions, window)
        compiled = self._compiled_blocks
        compiled = compiled if cache is None and torch.is_grad_enabled() else None
        for i in layers:
            at = query_at if i == layers[-1] else None
            block = self.blocks[i]
            m = window_mask if window_mask is not None and block.attn.window else mask
            if compiled is not None:
                # The layer index only addresses a cache, and there is none: 0 for every layer,
                # so the shared graph is not specialised (and recompiled) per layer.
                block, args = compiled[i], (x, rope, m, None, 0, at)
            else:
                args = (x, rope, m, cache, i, at)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return x

    @staticmethod
    def _mask(
        B: int,
        T: int,
        offset: int,
        attention_mask: Tensor | None,
        doc_ids: Tensor | None,
        branch_ids: Tensor | None,
        device: torch.device,
        positions: Tensor | None = None,
        window: int | None = None,
    ) -> Tensor | None:
        """Boolean [B, 1, T, S] mask (True = may attend), or None for plain causal attention.

        window (no cache, so offset 0): each query also sees only keys less than `window`
        positions back, distances counted between `positions` [B, T]: right for packed
        documents, shared-prefix branches and left padding. With a cache, sliding-window layers
        see what its rings hold (`KVCache.window_keys`, `sliding_mask`)."""
        layout = doc_ids is not None or branch_ids is not None
        if window is not None and offset + T <= window:
            window = None  # no key can be out of the window
        if attention_mask is None and not layout and (offset == 0 or T == 1) and window is None:
            return None
        if layout and offset:
            raise ValueError(
                "doc_ids and branch_ids (packed rows) cannot be combined with a KV cache"
            )
        S = offset + T
        q_pos = torch.arange(offset, S, device=device)
        mask = (torch.arange(S, device=device)[None, :] <= q_pos[:, None]).expand(B, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S].bool()
        if doc_ids is not None:
            mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        if branch_ids is not None:
            q, k = branch_ids[:, None, :, None], branch_ids[:, None, None, :]
            mask = mask & ((k == 0) | (k == q))
        if window is not None:  # no cache (its rings make their own: `KVCache.window_keys`)
            mask = mask & (positions[:, None, :, None] - positions[:, None, None, :] < window)
        return mask

    def forward(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Logits [B, T, V] at every position (see `hidden` for the arguments)."""
        return self.lm_head(self.hidden(input_ids, **kwargs))

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow the embedding (and head) to `vocab_size`; new rows start at the mean embedding."""
        old = self.wte.weight
        n_old = old.shape[0]
        if vocab_size == n_old:
            return
        if vocab_size < n_old:
            raise ValueError(f"cannot shrink the vocabulary from {n_old} to {vocab_size}")
        wte = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            wte.weight[:n_old] = old
            wte.weight[n_old:] = old.mean(0, keepdim=True)
        self.wte = wte
        if self.config.tie_embeddings:
            self.lm_head = Linear(
                old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype
            )
            self.lm_head.weight = self.wte.weight
        else:
            head_old = self.lm_head.weight
            head = Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
            with torch.no_grad():
                head.weight[:n_old] = head_old
                head.weight[n_old:] = head_old.mean(0, keepdim=True)
            self.lm_head = head
        self._cap_head()
        self.config = self.config.with_(vocab_size=vocab_size)
        for block in self.blocks:
            block.attn.config = self.config

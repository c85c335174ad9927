"""The decode loop behind `nanotune serve` and GRPO: continuous batching over one base and many
adapters.

One thread owns the model. Each turn of its loop it admits waiting sequences (a prefill each,
into a free slot of the KV cache), then runs ONE forward for every active sequence, whatever
adapter each uses (`decoding.lora`), picks each row's next token with that request's own sampling
settings and generator, and hands the token to the request. Sequences join and leave at token
boundaries; a finished or cancelled one frees its slot at once (the last slot moves into it, so
active sequences always sit in rows 0..n-1 and the batch is a view, never a gather).

The slot cache holds a row per active sequence (at most `max_batch`) and its length follows the
longest active sequence (both grown by doubling, released when the server is idle), so memory
follows what is running, not the longest request that could come: at most
`max_batch x context x kv_bytes_per_token`, where a sliding-window layer's share is a ring of
its window (`_SlotCache`), however long the sequence. A long prompt is computed `PREFILL_CHUNK`
tokens at a time, so what one prefill allocates besides the cache is bounded too. Requests past
`max_queue` waiting are refused, not queued.

With `compile` (serve --compile, rl.compile) a decode step where every row decodes one token
on the same weights runs as one compiled graph (`models.compiled_decode`): the rows padded to a
batch bucket (a power of two) with free slots, which is also how many rows the cache then holds;
the cache's length stays a dynamic dimension, so a bucket compiles once.

One sequence's failure (a sampling setting that makes its logits non-finite, a bug in its
path) ends that sequence alone; only a failure of the batched forward itself ends them all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from nanotune.decoding.limits import MAX_BATCH, MAX_QUEUE, PREFIX_CACHE_MB
from nanotune.decoding.lora import Routing, serve_adapters, served_layers
from nanotune.errors import NanotuneError
from nanotune.generate import (
    GenerationConfig,
    TextStream,
    default_stop_ids,
    penalize,
    sample_rows,
)
from nanotune.models.compiled_decode import CompiledDecoder, StaticCache, batch_bucket
from nanotune.models.linear import Int8Linear
from nanotune.models.transformer import NO_KEY, Transformer
from nanotune.tokenizer import Tokenizer
from nanotune.weights.peft import adapter_pairs, adapter_tokenizer

BASE = 0  # the adapter id of "no adapter"
# A prompt with at most this many tokens left to compute (after its cached prefix) joins the
# next decode step, a row per token; a longer one gets a forward of its own.
MERGED_PREFILL = 32
# A longer prompt is computed this many tokens at a time: attention scores, MLP activations and
# (for echo with logprobs) vocabulary logits exist for one chunk only. An 8,000-token prompt on
# SmolLM2 computed whole took ~12 GB of temporaries.
PREFILL_CHUNK = 512


class QueueFull(NanotuneError):
    """More sequences are waiting than the server takes (`max_queue`)."""


@dataclass(frozen=True)
class Sampling:
    """One request's settings, as checked by `serve.protocol` (OpenAI names and meanings)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only)
    echo: bool = False  # with logprobs: the prompt's tokens scored too


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, best first


@dataclass
class Event:
    """What a sequence tells its request: a token (with the text it made final) or its end."""

    token: int | None = None
    text: str = ""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, adapter, settings and what it has produced."""

    prompt: list[int]
    adapter: int
    sampling: Sampling
    tokenizer: Tokenizer
    sink: Callable[[Event], None]
    output: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop token that ended it (counted, not in `output`)
    cancelled: bool = False
    # Set by the engine:
    slot: int = -1
    pos: int = 0  # the next cache position to write (tokens so far)
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet in the cache

    def __post_init__(self) -> None:
        s = self.sampling
        self.config = GenerationConfig(
            max_new_tokens=max(s.max_tokens, 1),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            stop=s.stop,
            stop_token_ids=s.stop_token_ids,
            seed=s.seed,
        )
        self.stop_ids = set(
            s.stop_token_ids if s.stop_token_ids is not None else default_stop_ids(self.tokenizer)
        )
        self.text = TextStream(self.tokenizer, s.stop)
        self.generator = torch.Generator()
        if s.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(s.seed)
        # echo with logprobs: every prompt position is scored, so the prompt is computed whole.
        self.scores_prompt = s.echo and s.logprobs is not None
        self.seen: Tensor | None = None  # repetition penalty: tokens of prompt and output
        self.counts: Tensor | None = None  # presence/frequency penalties: output token counts


@dataclass
class Adapter:
    id: int
    name: str
    path: str
    tokenizer: Tokenizer
    active: int = 0  # sequences using it now; an unloaded adapter is freed when none are left


class _SlotCache:
    """Keys and values of up to `max_rows` sequences, each in its own row from position 0.

    A sliding-window layer keeps a ring of `ring` columns per row instead of the row's length:
    the key of position p at p % ring, its position in `key_pos` [rows, ring] (NO_KEY where
    none). A decode forward writes up to MERGED_PREFILL keys of one row (a joining prompt)
    before any is read, so the ring holds the window and MERGED_PREFILL - 1 more."""

    def __init__(self, model: Transformer, max_rows: int) -> None:
        self.config = c = model.config
        self.max_rows = max_rows
        self.dtype = model.cache_dtype
        self.device = model.device
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.rows = 0
        self.capacity = 0
        self.windowed = [c.window(i) is not None for i in range(c.n_layer)]
        self.ring = 0
        if any(self.windowed):
            self.ring = min(c.sliding_window + MERGED_PREFILL - 1, c.block_size)
        self.key_pos: Tensor | None = None

    def reserve(self, length: int, rows: int) -> None:
        """Room for `rows` rows of `length` positions (each grown by doubling, up to `max_rows`
        and the context; a ring only by rows). One layer at a time, so growing holds one layer
        twice, not all."""
        if length <= self.capacity and rows <= self.rows:
            return
        c = self.config
        new_len = self.capacity
        if length > self.capacity:
            new_len = min(c.block_size, max(length, 2 * self.capacity, 64))
        new_rows = self.rows
        if rows > self.rows:
            new_rows = min(self.max_rows, max(rows, 2 * self.rows))
        for tensors in (self.k, self.v):
            if not tensors:
                tensors.extend([None] * c.n_layer)  # type: ignore[list-item]
            for i, old in enumerate(tensors):
                ring = self.windowed[i]
                if ring and old is not None and new_rows == self.rows:
                    continue
                shape = (new_rows, c.kv_heads, self.ring if ring else new_len, c.hd)
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old is not None:
                    fresh[: old.shape[0], :, : old.shape[2]] = old
                tensors[i] = fresh
        if self.ring and (self.key_pos is None or new_rows != self.rows):
            fresh = torch.full((new_rows, self.ring), NO_KEY, device=self.device)
            if self.key_pos is not None:
                fresh[: self.rows] = self.key_pos
            self.key_pos = fresh
        self.rows, self.capacity = new_rows, new_len

    def clear(self, row: int) -> None:
        """A row's rings hold no key (a new sequence starts there)."""
        if self.key_pos is not None:
            self.key_pos[row] = NO_KEY

    def move(self, src: int, dst: int, length: int) -> None:
        for i, t in enumerate((*self.k, *self.v)):
            if self.windowed[i % len(self.k)]:
                t[dst] = t[src]
            else:
                t[dst, :, :length] = t[src, :, :length]
        if self.key_pos is not None:
            self.key_pos[dst] = self.key_pos[src]

    def release(self) -> None:
        self.k, self.v, self.rows, self.capacity, self.key_pos = [], [], 0, 0, None


class _View:
    """What `Transformer.hidden` sees of the slot cache in one forward.

    Prefill (`positions` None): one row, written from position `length`. Decode: one new token
    per row, written at its own position in its slot (`rows`: slots 0..n-1, or the slot of each
    row when a joining prompt has several rows in one slot); keys up to the longest row are
    returned (gathered per row in the second case) and the attention mask hides the rest.

    Sliding-window layers (`_SlotCache.ring`): a decode forward writes each row's key into its
    slot's ring first and returns the rings whole; a prefill chunk gets the ring as it was (its
    filled columns) followed by its own keys, and the ring keeps the last of them. The window
    mask comes from the ring positions `window_keys` gives.
    """

    def __init__(
        self, cache: _SlotCache, rows: slice | Tensor, length: int, positions: Tensor | None
    ):
        self.cache, self.rows, self.length, self.positions = cache, rows, length, positions
        self.max_len = cache.capacity
        self._ring_at: Tensor | None = None  # a prefill chunk's ring columns
        self._filled = 0  # ... and how many ring columns its keys follow
        if positions is not None:
            slots = (
                rows
                if isinstance(rows, Tensor)
                else torch.arange(rows.start, rows.stop, device=cache.device)
            )
            # Where each row's new key goes for each kv head, as rows of the cache flattened to
            # [slots * heads * capacity, head dim]: one index_copy_ per layer (advanced-index
            # assignment over (slot, :, position) was a quarter of a decode step).
            heads = cache.config.kv_heads
            head = torch.arange(heads, device=cache.device)
            self.flat = (
                (slots[:, None] * heads + head) * cache.capacity + positions[:, None]
            ).view(-1)
            if cache.ring:  # the same in the rings, and in their positions
                at = positions % cache.ring
                self.ring_flat = ((slots[:, None] * heads + head) * cache.ring + at[:, None]).view(
                    -1
                )
                self.pos_flat = slots * cache.ring + at

    def window_keys(self, positions: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """The positions [rows, S] of the keys the sliding-window layers attend over (see
        `KVCache.window_keys`); None where plain causal attention over the new keys is exact."""
        c = self.cache
        if not c.ring:
            return None
        if self.positions is not None:
            c.key_pos.view(-1).index_copy_(0, self.pos_flat, self.positions)
            return c.key_pos[self.rows]
        T, start = positions.shape[1], self.length
        self._filled = min(start, c.ring)
        row = c.key_pos[self.rows]  # a view: [1, ring]
        keys = torch.cat((row[:, : self._filled], positions), dim=1)
        keep = min(T, c.ring)
        self._ring_at = torch.arange(start + T - keep, start + T, device=c.device) % c.ring
        row[:, self._ring_at] = positions[:, T - keep :]
        if start == 0 and T <= c.config.sliding_window:
            return None
        return keys

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        K, V = self.cache.k[layer], self.cache.v[layer]
        T = k.shape[2]
        if self.cache.windowed[layer]:
            return self._update_ring(K, V, k.to(K.dtype), v.to(V.dtype))
        if self.positions is None:
            K[self.rows, :, self.length : self.length + T] = k
            V[self.rows, :, self.length : self.length + T] = v
        else:
            D = K.shape[-1]
            K.view(-1, D).index_copy_(0, self.flat, k.reshape(-1, D).to(K.dtype))
            V.view(-1, D).index_copy_(0, self.flat, v.reshape(-1, D).to(V.dtype))
        end = self.length + T
        return K[self.rows, :, :end], V[self.rows, :, :end]

    def _update_ring(self, K: Tensor, V: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.positions is not None:
            D = K.shape[-1]
            K.view(-1, D).index_copy_(0, self.ring_flat, k.reshape(-1, D))
            V.view(-1, D).index_copy_(0, self.ring_flat, v.reshape(-1, D))
            return K[self.rows], V[self.rows]
        keys = torch.cat((K[self.rows, :, : self._filled], k), dim=2)
        values = torch.cat((V[self.rows, :, : self._filled], v), dim=2)
        keep = self._ring_at.shape[0]
        K[self.rows, :, self._ring_at] = k[:, :, -keep:]
        V[self.rows, :, self._ring_at] = v[:, :, -keep:]
        return keys, values


Entry = tuple[list[Tensor], list[Tensor], Tensor | None]
"""A cached prompt's keys, values (per layer: its positions, or a sliding-window layer's ring)
and the rings' positions (None without sliding-window layers)."""


class _PrefixCache:
    """Keys and values of recent prompts, so that a prompt starting as one of them did (a chat's
    system prompt, a few-shot context, the context lm-eval scores each choice after) prefills
    only the rest: vLLM's automatic prefix caching, by whole prompts, least recently used first
    out, bounded by `max_bytes` of tensors. Entries are per adapter: its deltas change the keys.

    Sliding-window layers: an entry holds what the prompt's rings held (the last window +
    MERGED_PREFILL - 1 keys of the prompt), so it serves a shared prefix only where the `window`
    - 1 keys before the prefix's end are among them (or the whole prompt fit): the same prompt
    again, a conversation going on from it, a prompt of at most the ring's length; any other
    match is declined (computed afresh), never served inexactly.
    """

    def __init__(self, max_bytes: int, window: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.window = window
        self.entries: OrderedDict[tuple[int, tuple[int, ...]], Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.reused = 0  # prompt tokens not recomputed

    @staticmethod
    def _size(entry: Entry) -> int:
        ks, vs, key_pos = entry
        tensors = [*ks, *vs, *([] if key_pos is None else [key_pos])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _covers(self, key_pos: Tensor | None, n: int) -> bool:
        """Whether an entry's rings hold the keys a prompt sharing its first n tokens needs."""
        if key_pos is None or n == 0:
            return True
        need = torch.arange(max(0, n - self.window + 1), n, device=key_pos.device)
        return bool((key_pos[need % key_pos.shape[0]] == need).all())

    def match(self, adapter: int, prompt: list[int]) -> tuple[int, Entry | None]:
        """(p, entry): the longest prefix of `prompt` a cached prompt shares, at most all but
        its last token (whose logits the prefill must give), and that entry's keys/values."""
        best, found = 0, None
        limit = len(prompt) - 1
        for key, entry in self.entries.items():
            if key[0] != adapter:
                continue
            tokens = key[1]
            n = 0
            for a, b in zip(tokens, prompt[:limit], strict=False):
                if a != b:
                    break
                n += 1
            if n > best and self._covers(entry[2], n):
                best, found = n, key
        if found is None:
            return 0, None
        self.entries.move_to_end(found)
        self.hits += 1
        self.reused += best
        return best, self.entries[found]

    def add(self, adapter: int, prompt: list[int], cache: _SlotCache, slot: int) -> None:
        key = (adapter, tuple(prompt))
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        n = len(prompt)

        def kept(layer: int, t: Tensor) -> Tensor:
            return (t[slot] if cache.windowed[layer] else t[slot, :, :n]).clone()

        entry = (
            [kept(i, k) for i, k in enumerate(cache.k)],
            [kept(i, v) for i, v in enumerate(cache.v)],
            None if cache.key_pos is None else cache.key_pos[slot].clone(),
        )
        size = self._size(entry)
        if size > self.max_bytes:
            return
        self.entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= self._size(self.entries.popitem(last=False)[1])

    def drop(self, adapter: int) -> None:
        for key in [k for k in self.entries if k[0] == adapter]:
            self.bytes -= self._size(self.entries.pop(key))


def check_adapters_attach(dtype: str, what: str = "--adapter") -> None:
    """Refuse LoRA adapters over a base decoded in `dtype` int8: its quantized linear layers
    hold no float weight for them to attach to."""
    if dtype == "int8":
        raise NanotuneError(
            f"{what}: the base is served with --dtype int8, whose quantized linear layers "
            "adapters cannot attach to; merge the adapter into its base (`nanotune merge`) and "
            "serve that, or serve with --dtype bfloat16"
        )


class Engine:
    """Owns the model and its decode thread; requests come in by `submit`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        prefix_cache_mb: int = PREFIX_CACHE_MB,
        route_adapters: bool = True,
        compile: bool = False,
    ) -> None:
        """route_adapters: wrap the block linears (in place) so adapter folders can be loaded
        and chosen per row (serving); False leaves the model's modules as they are, so a model
        being trained decodes as it is, its own LoRA layers included (GRPO).

        compile: decode steps through torch.compile (`models.compiled_decode`): a graph per
        batch bucket (powers of two up to max_batch), for steps where every row decodes one
        token on the base (or, unrouted, on the model as it is). A step with a joining prompt's
        rows or with adapters routed per row runs eager, as do prompts."""
        if max_batch < 1 or max_queue < 1:
            raise NanotuneError("--max-batch and --max-queue must be at least 1")
        if prefix_cache_mb < 0:
            raise NanotuneError("--prefix-cache-mb must be 0 (off) or more")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model.config.block_size
        self.routing: Routing = serve_adapters(model) if route_adapters else Routing()
        self.layers = served_layers(model)
        self.adapters: dict[str, Adapter] = {}  # by name; unloaded ones leave this at once
        self._by_id: dict[int, Adapter] = {}
        self._next_id = BASE + 1
        self._cache = _SlotCache(model, max_batch)
        self._decoder = CompiledDecoder(model) if compile else None
        self.compiled_steps = 0  # decode steps that ran compiled
        self._prefixes = _PrefixCache(prefix_cache_mb * 2**20, model.config.sliding_window)
        # Longrope (Phi-3): the original context, past which a sequence turns by the long factors.
        self.longrope = model.longrope[0] if model.longrope is not None else None
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cv = threading.Condition()
        self._model_lock = threading.Lock()  # held for each step; adapters change between
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.peak_running = 0  # the largest decode batch so far

    @property
    def compiles(self) -> bool:
        """Whether decode steps run compiled (`compile=`)."""
        return self._decoder is not None

    # ---- adapters -------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> Adapter:
        """Read an adapter folder and make it servable under `name` (checked first; a bad
        folder changes nothing)."""
        if not name or name in self.adapters:
            raise NanotuneError(f"an adapter named {name!r} is already loaded; unload it first")
        if not self.layers:
            raise NanotuneError("this engine decodes its model as it is; it takes no adapters")
        # Every way in (serve's --adapter, /v1/load_lora_adapter) passes here.
        if any(isinstance(layer.base, Int8Linear) for layer in self.layers.values()):
            check_adapters_attach("int8", f"adapter {name!r} ({path})")
        pairs = adapter_pairs(self.model, path)  # reads and checks; the model is untouched
        tokenizer = adapter_tokenizer(path, self.tokenizer)
        with self._model_lock:
            adapter = Adapter(self._next_id, name, str(path), tokenizer)
            self._next_id += 1
            for where, pair in pairs.items():
                self.layers[where].pairs[adapter.id] = pair
            self.adapters[name] = adapter
            self._by_id[adapter.id] = adapter
        return adapter

    def unload_adapter(self, name: str) -> None:
        """New requests can no longer name it; requests already using it finish with it."""
        with self._model_lock, self._cv:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise NanotuneError(f"no adapter named {name!r} is loaded")
            if not adapter.active:
                self._free(adapter)

    def _free(self, adapter: Adapter) -> None:
        self._prefixes.drop(adapter.id)
        for layer in self.layers.values():
            layer.pairs.pop(adapter.id, None)
        self._by_id.pop(adapter.id, None)

    # ---- requests -------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when that would pass `max_queue`."""
        with self._cv:
            if self._stopping:
                raise NanotuneError("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"the server has {len(self._waiting)} requests waiting (max_queue="
                    f"{self.max_queue}); retry later"
                )
            for seq in seqs:
                if seq.adapter != BASE:
                    adapter = self._by_id.get(seq.adapter)
                    if adapter is None or self.adapters.get(adapter.name) is not adapter:
                        raise NanotuneError("the adapter was unloaded while the request came in")
            for seq in seqs:
                if seq.adapter != BASE:
                    self._by_id[seq.adapter].active += 1
            self._waiting.extend(seqs)
            self._cv.notify()

    @property
    def load(self) -> dict[str, int]:
        return {
            "running": len(self._active),
            "waiting": len(self._waiting),
            "peak_running": self.peak_running,
            "prefix_hits": self._prefixes.hits,
            "prefix_tokens_reused": self._prefixes.reused,
        }

    def run(self, prompts: list[list[int]], sampling: list[Sampling]) -> list[Sequence]:
        """Decode every prompt (on the base) to its end in the calling thread, batched
        continuously as the server's thread does, and return the finished sequences in order.
        For a caller that owns the model between calls (GRPO's generation during training);
        not while `start` has a thread running. A sequence that fails raises here."""
        if self._thread is not None:
            raise RuntimeError("Engine.run with the engine thread running")
        errors: list[str] = []

        def sink(event: Event) -> None:
            if event.error:
                errors.append(event.error)

        seqs = [
            Sequence(list(p), BASE, s, self.tokenizer, sink)
            for p, s in zip(prompts, sampling, strict=True)
        ]
        try:
            for lo in range(0, len(seqs), self.max_queue):
                self.submit(seqs[lo : lo + self.max_queue])
                # no_grad, not inference_mode: the caller's model goes on training, and tensors
                # its layers derive here (LoRA slices, bf16 weight copies) must stay ordinary.
                with torch.no_grad(), self._model_lock:
                    while self._waiting or self._active:
                        room = self.max_batch - len(self._active)
                        self._step(
                            [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                        )
        finally:
            # The caller trains next (GRPO's backward): no cache row outlives the sampling, nor
            # a sequence left half done by a failed forward.
            self._waiting.clear()
            self._active.clear()
            self._cache.release()
        if errors:
            raise RuntimeError(f"decoding failed: {errors[0]}")
        return seqs

    # ---- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nanotune-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._waiting or self._active or self._stopping):
                        self._cache.release()
                        self._cv.wait()
                    if self._stopping and not (self._waiting or self._active):
                        self._cache.release()
                        return
                    room = self.max_batch - len(self._active)
                    admitted = [
                        self._waiting.popleft() for _ in range(min(room, len(self._waiting)))
                    ]
                with self._model_lock:
                    try:
                        self._step(admitted)
                    except Exception as e:  # a bug or out of memory: fail these, keep serving
                        failed = [*self._active, *(s for s in admitted if s.finish_reason is None)]
                        for seq in failed:
                            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                        self._active.clear()

    def _step(self, admitted: list[Sequence]) -> None:
        for seq in admitted:
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._place(seq)
            if (
                seq.scores_prompt
                or seq.sampling.max_tokens == 0
                or len(seq.pending) > MERGED_PREFILL
            ):
                try:
                    self._prefill(seq)
                except Exception as e:  # its own forward: it fails alone
                    self._fail(seq, e)
        for seq in [s for s in self._active if s.cancelled]:
            self._finish(seq, "cancelled")
        if self.longrope is not None:  # its next token reaches past the original context
            for seq in [s for s in self._active if not s.pending and s.pos == self.longrope]:
                try:
                    self._recompute(seq)
                except Exception as e:  # its own forward: it fails alone
                    self._fail(seq, e)
        if self._active:
            self._decode()

    def _route(self, adapters: list[int]) -> None:
        """Set which rows of the next forward use which adapter (one id per row)."""
        if len(set(adapters)) == 1:
            self.routing.groups = [] if adapters[0] == BASE else [(adapters[0], None)]
            return
        groups: dict[int, list[int]] = {}
        for row, a in enumerate(adapters):
            if a != BASE:
                groups.setdefault(a, []).append(row)
        device = self.model.device
        self.routing.groups = [(a, torch.tensor(r, device=device)) for a, r in groups.items()]

    def _place(self, seq: Sequence) -> None:
        """Give a new sequence a slot, its cached prompt prefix (if any) and what is left of the
        prompt to compute (`pending`)."""
        seq.slot = len(self._active)
        self._active.append(seq)
        cache = self._cache
        cache.reserve(len(seq.prompt) + 1, len(self._active))
        cache.clear(seq.slot)
        p, kv = 0, None
        if not seq.scores_prompt and self._cacheable(seq):
            p, kv = self._prefixes.match(seq.adapter, seq.prompt)
        if kv is not None:
            ks, vs, key_pos = kv
            for i, (cached, kept) in enumerate(zip((*ks, *vs), (*cache.k, *cache.v), strict=True)):
                if cache.windowed[i % len(cache.k)]:  # a ring: its keys past the prefix unseen
                    kept[seq.slot] = cached
                else:
                    kept[seq.slot, :, :p] = cached[:, :p]
            if key_pos is not None:
                cache.key_pos[seq.slot] = key_pos.masked_fill(key_pos >= p, NO_KEY)
        seq.pos, seq.pending = p, seq.prompt[p:]

    def _prefill(self, seq: Sequence) -> None:
        """Forwards of its own for a long prompt (or one whose every position is scored), a
        chunk of `PREFILL_CHUNK` tokens at a time."""
        self._route([seq.adapter])
        s = seq.sampling
        if seq.scores_prompt:
            seq.prompt_logprobs = [None]
        h = self._compute(seq, score=seq.scores_prompt)
        if self._prefixes.max_bytes and self._cacheable(seq):
            self._prefixes.add(seq.adapter, seq.prompt, self._cache, seq.slot)
        if s.max_tokens == 0:  # echo only: the prompt scored, nothing generated
            self._finish(seq, "length")
            return
        self._advance([seq], self.model.lm_head(h[-1:]))

    def _compute(self, seq: Sequence, score: bool) -> Tensor:
        """Compute the sequence's pending tokens into its slot, `PREFILL_CHUNK` at a time (with
        score, each position's logprob of the prompt's next token); the last hidden states."""
        s = seq.sampling
        long = self._long_rope([seq.pos + len(seq.pending)])
        while seq.pending:
            chunk, seq.pending = seq.pending[:PREFILL_CHUNK], seq.pending[PREFILL_CHUNK:]
            ids = torch.tensor([chunk], dtype=torch.long, device=self.model.device)
            view = _View(self._cache, slice(seq.slot, seq.slot + 1), seq.pos, None)
            h = self.model.hidden(ids, cache=view, long_rope=long)[0]
            seq.pos += len(chunk)
            if score:  # each position scores the prompt's next token
                targets = seq.prompt[seq.pos - len(chunk) + 1 : seq.pos + 1]
                logprobs = self.model.lm_head(h[: len(targets)]).float().log_softmax(-1)
                seq.prompt_logprobs += [
                    _scored(lp, t, s.logprobs) for lp, t in zip(logprobs, targets, strict=True)
                ]
        return h

    def _long_rope(self, lengths: list[int]) -> Tensor | None:
        """Longrope: per row, whether its sequence, `lengths` tokens long once the forward is
        done, is past the original context (so turns by the long factors at every position)."""
        if self.longrope is None:
            return None
        return torch.tensor([n > self.longrope for n in lengths], device=self.model.device)

    def _cacheable(self, seq: Sequence) -> bool:
        """Whether the prefix cache serves and keeps its prompt: not a longrope prompt past the
        original context, whose keys (long-turned) no shorter prompt shares."""
        return self.longrope is None or len(seq.prompt) <= self.longrope

    def _recompute(self, seq: Sequence) -> None:
        """Longrope (Phi-3): a sequence whose next token passes the original context turns by
        the long factors at every position from then on; its keys so far, short-turned, are
        computed again (as transformers' Phi-3 drops its cache there, and `generate` does), and
        its next token comes from the last of them."""
        self._route([seq.adapter])
        self._cache.clear(seq.slot)
        seq.pos, seq.pending = 0, [*seq.prompt, *seq.output]
        h = self._compute(seq, score=False)
        self._advance([seq], self.model.lm_head(h[-1:]))

    def _decode(self) -> None:
        """One forward for every active sequence: its last token, or, for one that just joined
        with a short prompt, each token of the prompt still to compute, one row per token (so
        a joining request costs no pass over the weights of its own)."""
        seqs = list(self._active)
        self.peak_running = max(self.peak_running, len(seqs))
        tokens, positions, slots, adapters, last, lengths = [], [], [], [], [], []
        for seq in seqs:
            new = seq.pending or [seq.output[-1]]
            tokens += new
            positions += range(seq.pos, seq.pos + len(new))
            slots += [seq.slot] * len(new)
            adapters += [seq.adapter] * len(new)
            lengths += [seq.pos + len(new)] * len(new)
            last.append(len(tokens) - 1)
        self._route(adapters)
        if self._decoder is not None and len(tokens) == len(seqs) and not self.routing.groups:
            h = self._compiled_step(tokens, positions, lengths)
        else:
            h = self._eager_step(tokens, positions, slots, lengths, len(seqs))
        logits = self.model.lm_head(h[last, -1])
        for seq in seqs:  # every row's new tokens are in the cache before any row moves
            if seq.pending:
                seq.pos, seq.pending = len(seq.prompt), []
                if self._prefixes.max_bytes and self._cacheable(seq):
                    self._prefixes.add(seq.adapter, seq.prompt, self._cache, seq.slot)
            else:
                seq.pos += 1
        self._advance(seqs, logits)

    def _eager_step(
        self, tokens: list[int], positions: list[int], slots: list[int], lengths: list[int], n: int
    ) -> Tensor:
        """The decode forward [rows, 1, C]: attention over the columns up to the longest row."""
        device = self.model.device
        pos = torch.tensor(positions, device=device)
        S = int(pos.max()) + 1
        self._cache.reserve(S, n)
        mask = torch.arange(S, device=device)[None, :] <= pos[:, None]
        # Rows are slots 0..n-1 unless a prompt spreads over several rows of one slot.
        rows = slice(0, n) if len(tokens) == n else torch.tensor(slots, device=device)
        view = _View(self._cache, rows, S - 1, pos)
        ids = torch.tensor(tokens, device=device)[:, None]
        return self.model.hidden(
            ids,
            positions=pos[:, None],
            attention_mask=mask,
            cache=view,
            long_rope=self._long_rope(lengths),
        )

    def _compiled_step(self, tokens: list[int], positions: list[int], lengths: list[int]) -> Tensor:
        """The decode forward of slots 0..n-1, a token each, through the compiled step on the
        batch bucket's first B slots: rows n..B-1 are free slots, decoding token 0 at position
        0 into their own (unread) columns; their states are dropped."""
        n = len(tokens)
        B = batch_bucket(n, self.max_batch)
        cache = self._cache
        cache.reserve(max(positions) + 1, B)
        pad = B - n
        device = self.model.device
        ids = torch.tensor([*tokens, *[0] * pad], device=device)[:, None]
        pos = torch.tensor([*positions, *[0] * pad], device=device)
        long = self._long_rope([*lengths, *[1] * pad])
        key_pos = None if cache.key_pos is None else cache.key_pos[:B]
        view = StaticCache(
            [t[:B] for t in cache.k],
            [t[:B] for t in cache.v],
            cache.windowed,
            cache.ring,
            key_pos,
            pos,
        )
        self.compiled_steps += 1
        return self._decoder.step(view, ids, pos[:, None], long)[:n]

    def _advance(self, seqs: list[Sequence], logits: Tensor) -> None:
        """Pick each sequence's next token from its row of logits [n, V], all rows sampled at
        once (`generate.sample_rows`: one uniform per sampled row from the sequence's own
        generator), and hand the tokens over (or end the sequences). A row whose settings or
        probabilities fail ends alone."""
        logits = logits.float()
        live, rows, scored, changed = [], [], [], False
        for row, seq in enumerate(seqs):
            own = logits[row]
            try:
                adjusted = self._adjust(seq, own)
            except Exception as e:  # its settings: it fails alone
                self._fail(seq, e)
                continue
            live.append(seq)
            rows.append(adjusted)
            changed |= adjusted is not own
            scored.append(own.log_softmax(-1) if seq.sampling.logprobs is not None else None)
        if not live:
            return
        batch = torch.stack(rows) if changed or len(live) < len(seqs) else logits
        configs = [seq.config for seq in live]
        uniforms = None
        if any(c.temperature > 0 for c in configs):
            uniforms = torch.cat(
                [
                    torch.rand(1, generator=seq.generator) if c.temperature > 0 else torch.zeros(1)
                    for seq, c in zip(live, configs, strict=True)
                ]
            ).to(batch.device)
        tokens, ok = sample_rows(batch, configs, uniforms)
        for seq, token, fine, lp in zip(live, tokens.tolist(), ok.tolist(), scored, strict=True):
            if not fine:
                self._fail(
                    seq,
                    RuntimeError(
                        "sampling probabilities are not finite (temperature="
                        f"{seq.sampling.temperature}); the logits overflowed"
                    ),
                )
                continue
            try:
                self._take(seq, token, lp)
            except Exception as e:  # a bug in its own path: it fails alone
                self._fail(seq, e)

    def _take(self, seq: Sequence, token: int, scored: Tensor | None) -> None:
        """Hand the sequence its next token (or end it on a stop token or its length)."""
        s = seq.sampling
        lp = _scored(scored, token, s.logprobs) if scored is not None else None
        if token in seq.stop_ids:
            # Reported with its logprob, as vLLM and OpenAI do: clients that score text
            # (lm-eval's echo + max_tokens 1) read the last logprob as the generated token's.
            seq.stop_token = token
            self._finish(seq, "stop", logprob=lp)
            return
        seq.output.append(token)
        if seq.seen is not None:
            seq.seen[0, token] = True
        if seq.counts is not None:
            seq.counts[token] += 1
        text = seq.text.push(token)
        seq.sink(Event(token=token, text=text, logprob=lp))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.output) >= s.max_tokens:
            self._finish(seq, "length")

    def _adjust(self, seq: Sequence, logits: Tensor) -> Tensor:
        """OpenAI's logit bias and presence/frequency penalties (on output tokens), then Hugging
        Face's repetition penalty (on prompt and output tokens); `logits` itself when none is
        set."""
        s = seq.sampling
        V = logits.shape[-1]
        if s.repetition_penalty != 1.0 and seq.seen is None:
            seq.seen = torch.zeros((1, V), dtype=torch.bool, device=logits.device)
            seq.seen[0, torch.tensor(seq.prompt, device=logits.device)] = True
        if s.logit_bias:
            ids = torch.tensor([t for t, _ in s.logit_bias], device=logits.device)
            bias = torch.tensor([b for _, b in s.logit_bias], device=logits.device)
            logits = logits.index_add(0, ids, bias)
        if s.presence_penalty or s.frequency_penalty:
            if seq.counts is None:
                seq.counts = torch.zeros(V, device=logits.device)
            c = seq.counts
            logits = logits - s.frequency_penalty * c - s.presence_penalty * (c > 0).float()
        if seq.seen is not None:
            logits = penalize(logits[None], seq.seen, s.repetition_penalty)[0]
        return logits

    def _fail(self, seq: Sequence, e: Exception) -> None:
        self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        error: str | None = None,
        logprob: TokenLogprob | None = None,
    ) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if 0 <= seq.slot < len(self._active) and self._active[seq.slot] is seq:
            last = self._active[-1]
            if last is not seq:
                self._cache.move(last.slot, seq.slot, last.pos)
                self._active[seq.slot] = last
                last.slot = seq.slot
            self._active.pop()
        seq.slot = -1
        if seq.adapter != BASE:
            with self._cv:  # submit counts under this lock too
                adapter = self._by_id[seq.adapter]
                adapter.active -= 1
                if not adapter.active and self.adapters.get(adapter.name) is not adapter:
                    self._free(adapter)  # unloaded while this request ran
        rest = "" if reason in ("cancelled", "error") else seq.text.finish()
        seq.sink(
            Event(
                token=seq.stop_token,
                text=rest,
                logprob=logprob,
                finish_reason=reason,
                error=error,
            )
        )


def _scored(logprobs: Tensor, token: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)

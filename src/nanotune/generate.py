"""Text generation: batched left-padded prompts, a KV cache, sampling, stop rules and streaming.

Works on any `Transformer` and any tokenizer with the `nanotune.tokenizer.Tokenizer` interface
(`encode`, `decode`, `eos_id`, `pad_id`, `special_tokens`, `chat_template`,
`apply_chat_template`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanotune.errors import NanotuneError

if TYPE_CHECKING:  # torch loads on first generation, so the CLI parser (sampling flags) is light
    import torch
    from torch import Tensor

    from nanotune.models.transformer import Transformer

# Special tokens that close a chat turn in the common templates (ChatML, Llama 3, Phi, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


# One budget for `nanotune generate`, `chat` and `eval` (eval.max_new_tokens) unless set.
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop; repetition_penalty follows Hugging Face (divide
    positive logits, multiply negative ones, of tokens already in prompt or output)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    """Most tokens generated per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: int = 0
    """Sample among the K most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Sample among the most likely tokens covering this probability; 1.0 = off."""
    repetition_penalty: float = 1.0
    """Above 1 discourages tokens already seen; 1.0 = off."""
    stop: tuple[str, ...] = ()
    """Stop at any of these texts (not included in the output)."""
    stop_token_ids: tuple[int, ...] | None = None
    """Stop at any of these token ids; None = the tokenizer's eos and chat end-of-turn token."""
    seed: int | None = None
    """Seed for reproducible sampling."""
    compile: bool = False
    """Decode through torch.compile: one graph per step on static shapes (the KV cache read
    whole, rounded up to 128 columns), compiled once per batch size and cache length; the
    prompt stays eager. Pays off over long or many generations (the first costs the compile)."""

    def __post_init__(self) -> None:
        # Every float first: NaN passes every comparison below, and inf is no setting either.
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise NanotuneError(f"{name}={value!r} must be a number")
            if not math.isfinite(value):
                raise NanotuneError(f"{name}={value} must be a finite number")
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise NanotuneError(f"{name}={value!r} must be an integer")
        if self.max_new_tokens < 1:
            raise NanotuneError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise NanotuneError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise NanotuneError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise NanotuneError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter)")
        if self.repetition_penalty <= 0:
            raise NanotuneError(
                f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = no penalty)"
            )
        if any(not s for s in self.stop):
            raise NanotuneError("stop strings must not be empty")
        # Accept lists from callers and keep the dataclass hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


def default_stop_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos and, when it has a chat template, its end-of-turn token."""
    ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    if getattr(tokenizer, "chat_template", None):
        special = tokenizer.special_tokens
        ids += [special[t] for t in END_OF_TURN_TOKENS if t in special and special[t] not in ids]
    return ids


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts), ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise NanotuneError(
            "this model's tokenizer has no chat template; use a plain prompt (--prompt) or a "
            "chat model such as smollm2-135m-instruct"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def generate(
    model: Transformer,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
) -> list[str]:
    """Completions (without the prompt) for a batch of prompts, as text, stop strings trimmed."""
    config = config or GenerationConfig()
    outs = generate_ids(model, [_encode(tokenizer, p) for p in prompts], config, tokenizer)
    return [completion_text(tokenizer, ids, config.stop) for ids in outs]


def completion_text(tokenizer: Any, ids: Sequence[int], stop: Sequence[str] = ()) -> str:
    """Generated ids as the completion's text: decoded without special tokens, cut at the
    first stop string."""
    return _trim(_decode(tokenizer, list(ids)), stop)


def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    tokenizer: Any = None,
) -> list[list[int]]:
    """Generated token ids per prompt (stop tokens excluded).

    Without a tokenizer only `config.stop_token_ids` stop a row, and stop strings cannot be used.
    """
    config = config or GenerationConfig()
    # Every step yields the same growing lists; only the last state matters here.
    out, _ = deque(_decode_steps(model, prompts, config, tokenizer), maxlen=1)[0]
    return out


def stream(
    model: Transformer,
    tokenizer: Any,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
) -> Iterator[str]:
    """Yield the completion of one prompt in pieces, each as soon as it is printable.

    Multi-byte characters split across tokens are never emitted half-done, and text that may
    begin a stop string is held back (see `TextStream`).
    """
    config = config or GenerationConfig()
    text = TextStream(tokenizer, config.stop)
    seen = 0
    for out, _ in _decode_steps(model, [_encode(tokenizer, prompt)], config, tokenizer):
        for token in out[0][seen:]:
            if piece := text.push(token):
                yield piece
        seen = len(out[0])
    if piece := text.finish():
        yield piece


class TextStream:
    """The text of one growing completion, decoded incrementally, stop strings applied.

    Each `push(token)` decodes only a window of the last few tokens (not the whole output, which
    would cost O(n^2) over a long completion) and returns the text that became final: complete
    characters only, and none that could still begin a stop string. `stopped` turns true at the
    first stop string; `text` is the completion so far, cut there. `finish()` gives the rest.
    The window keeps the token before the new ones, so tokenizers that treat a leading space
    specially decode both sides of the difference alike (the scheme vLLM and TGI use).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.stopped = False
        self._prefix = self._read = 0  # ids[_prefix:_read] is decoded context already counted
        self._decoded = ""  # everything decoded so far, before stop strings
        self._emitted = 0
        self._longest = max((len(s) for s in self.stop), default=0)

    @property
    def text(self) -> str:
        return _trim(self._decoded, self.stop)

    def push(self, token: int) -> str:
        """Add one generated token; the newly printable text ("" while a character or a
        possible stop string is incomplete, or once stopped)."""
        self.ids.append(token)
        if self.stopped:
            return ""
        before = _decode(self.tokenizer, self.ids[self._prefix : self._read])
        after = _decode(self.tokenizer, self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._add(after[len(before) :])
            self._prefix, self._read = self._read, len(self.ids)
        return self._ready(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (a dangling partial character
        included, as a full decode would show it)."""
        if not self.stopped:
            before = _decode(self.tokenizer, self.ids[self._prefix : self._read])
            after = _decode(self.tokenizer, self.ids[self._prefix :])
            self._add(after[len(before) :])
            self._prefix = self._read = len(self.ids)
        return self._ready(final=True)

    def _add(self, piece: str) -> None:
        start = max(0, len(self._decoded) - self._longest + 1)
        self._decoded += piece
        if self.stop and _trim(self._decoded[start:], self.stop) != self._decoded[start:]:
            self.stopped = True

    def _ready(self, final: bool) -> str:
        text = self.text
        end = len(text)
        if not (final or self.stopped):
            end -= _stop_prefix_len(text, self.stop)
        piece = text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece


def _encode(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        return tokenizer.encode(prompt)
    return list(prompt)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special=True)


def _trim(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any stop string."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max(
        (k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


def _decode_steps(
    model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig, tokenizer: Any
) -> Iterator[tuple[list[list[int]], list[bool]]]:
    """Run generation, yielding (generated ids per row, finished per row) after every step."""
    import torch

    # As a decorator on the generator, inference mode holds inside each step, not between them.
    return torch.inference_mode()(_steps)(model, prompts, config, tokenizer)


def _steps(
    model: Transformer, prompts: Sequence[Sequence[int]], config: GenerationConfig, tokenizer: Any
) -> Iterator[tuple[list[list[int]], list[bool]]]:
    import torch

    if not prompts:
        raise NanotuneError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise NanotuneError(f"prompt {i} is empty: give at least one token of text")
    if config.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the output")
    if config.stop_token_ids is not None:
        stop_ids = set(config.stop_token_ids)
    else:
        stop_ids = set(default_stop_ids(tokenizer)) if tokenizer is not None else set()
    pad_id = _pad_id(tokenizer)
    # Stop strings are watched incrementally, one TextStream per row.
    texts = [TextStream(tokenizer, config.stop) for _ in prompts] if config.stop else None

    B, n_new = len(prompts), config.max_new_tokens
    lengths = [len(p) for p in prompts]
    T0 = max(lengths)
    room = model.config.block_size - n_new
    if T0 > room:
        raise NanotuneError(
            f"prompt of {T0} tokens does not fit: the context is {model.config.block_size} tokens "
            f"and max_new_tokens={n_new} leaves {max(room, 0)} for the prompt; shorten the prompt "
            "or lower max_new_tokens"
        )
    device = model.device
    ids = torch.full((B, T0), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T0 - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)

    # Left padding needs a key mask and per-row positions; an unpadded batch needs neither. The
    # mask is allocated once for the whole run: the model reads only its first S columns.
    mask = positions = next_pos = None
    if min(lengths) != T0:
        mask = torch.ones((B, T0 + n_new), dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            mask[i, : T0 - n] = 0
        positions = (mask[:, :T0].cumsum(-1) - 1).clamp(min=0)
        next_pos = positions[:, -1:] + 1

    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, dtype=torch.long, device=device)] = True

    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()

    # Longrope (Phi-3): a row turns by the long factors once it is longer than the original
    # context, every position of it; its cache, short-turned, is recomputed when it gets there
    # (as transformers' Phi-3 does), so the tokens so far are kept.
    longrope = model.longrope[0] if getattr(model, "longrope", None) else None
    history = [ids]

    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden
        if config.compile:  # the prompt eager, each new token through one compiled graph
            from nanotune.models.compiled_decode import CompiledDecoder

            hidden = CompiledDecoder(model).hidden
        cache = model.init_cache(B, T0 + n_new)
        h = model.hidden(ids, positions=positions, attention_mask=mask, cache=cache)
        logits = model.lm_head(h[:, -1])
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(n_new):
            tokens = pick_next(logits.float(), seen, config, generator)
            for i, t in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if t in stop_ids:
                    done[i] = True
                    continue
                out[i].append(t)
                if texts is not None:
                    texts[i].push(t)
                    done[i] = texts[i].stopped
            yield out, done
            if all(done) or step == n_new - 1:
                return
            # Finished rows keep running on padding so the batch stays rectangular.
            tokens = tokens.masked_fill(torch.tensor(done, device=device), pad_id)[:, None]
            if seen is not None:
                seen.scatter_(1, tokens, True)
            if longrope is not None:
                history.append(tokens)
                at = next_pos if next_pos is not None else torch.tensor(T0 + step)
            if longrope is not None and bool((at == longrope).any()):
                ids = torch.cat(history, dim=1)
                S = ids.shape[1]
                cache.reset()
                if mask is not None:
                    positions = (mask[:, :S].cumsum(-1) - 1).clamp(min=0)
                h = model.hidden(ids, positions=positions, attention_mask=mask, cache=cache)
            else:
                h = hidden(tokens, positions=next_pos, attention_mask=mask, cache=cache)
            logits = model.lm_head(h[:, -1])
            if next_pos is not None:
                next_pos = next_pos + 1
    finally:
        model.train(was_training)


def _pad_id(tokenizer: Any) -> int:
    # Padded positions are masked out, so any valid id will do.
    if tokenizer is None:
        return 0
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return candidate
    return 0


def pick_next(
    logits: Tensor, seen: Tensor | None, config: GenerationConfig, generator: torch.Generator
) -> Tensor:
    """Next token per row [B] from last-position logits [B, V], every row by `config`, one
    uniform per sampled row drawn from `generator`."""
    import torch

    B = logits.shape[0]
    if seen is not None:
        logits = penalize(logits, seen, config.repetition_penalty)
    uniforms = None
    if config.temperature > 0:
        uniforms = torch.rand(B, generator=generator, device=generator.device)
    tokens, ok = sample_rows(logits, [config] * B, uniforms)
    if not bool(ok.all()):
        raise RuntimeError(
            f"sampling probabilities are not finite (temperature={config.temperature}); "
            "the logits overflowed"
        )
    return tokens


def penalize(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Hugging Face's repetition penalty on the tokens marked in `seen` (same shape)."""
    import torch

    r = penalty
    return torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)


def sample_rows(
    logits: Tensor, configs: Sequence[GenerationConfig], uniforms: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(next token, sampled from finite probabilities) per row [B] of logits [B, V] (float32),
    each row by its own config's temperature (0: greedy), top_k and top_p, all rows at once.

    A sampled row takes the token where its cumulative probability first passes
    `uniforms[row]` (in [0, 1), drawn by the caller from that row's own generator): inverse-CDF
    sampling, one uniform per row per token, so a row's token depends on its logits, settings
    and generator alone, never on the rows beside it (every operation here works row by row).
    `uniforms` may be None when no row samples."""
    import torch

    greedy = logits.argmax(-1)
    temps = [c.temperature for c in configs]
    sampled = [t > 0 for t in temps]
    B, V = logits.shape
    if not any(sampled):
        return greedy, torch.ones(B, dtype=torch.bool, device=logits.device)
    assert uniforms is not None, "sampled rows need their uniforms"
    device = logits.device
    t = torch.tensor([t if s else 1.0 for t, s in zip(temps, sampled, strict=True)], device=device)
    x = logits / t[:, None]
    ks = [c.top_k if s else 0 for c, s in zip(configs, sampled, strict=True)]
    if any(ks):
        k = torch.tensor(ks, device=device)
        kth = torch.topk(x, min(max(ks), V)).values.gather(1, (k.clamp(1, V) - 1)[:, None])
        x = x.masked_fill((x < kth) & (k[:, None] > 0), float("-inf"))
    ps = [c.top_p if s else 1.0 for c, s in zip(configs, sampled, strict=True)]
    if any(p < 1.0 for p in ps):
        p = torch.tensor(ps, device=device)[:, None]
        sorted_logits, order = x.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the more likely ones already cover top_p; the first always stays
        # (and a row without a nucleus keeps every token, whatever its rounded sums reach).
        drop = (probs.cumsum(-1) - probs >= p) & (p < 1.0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_logits)
    cdf = x.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the pick is a token whose probability is not zero.
    target = torch.minimum(
        uniforms.to(cdf.dtype)[:, None] * total, total.nextafter(cdf.new_zeros(()))
    )
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=V - 1)
    is_sampled = torch.tensor(sampled, device=device)
    ok = ~is_sampled | (torch.isfinite(total[:, 0]) & (total[:, 0] > 0))
    return torch.where(is_sampled, picked, greedy), ok

"""The byte-level BPE a GGUF file describes in its `tokenizer.ggml.*` metadata.

This module reads no file: the weights loader opens the GGUF once and hands over the values of
the keys in `GGUF_KEYS` already decoded (strings, ints, lists), as `gguf.GGUFReader` gives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken

from nanotune.errors import NanotuneError
from nanotune.tokenizer.backends import (
    Backend,
    _TokenizersBackend,
    byte_level_tokenizer,
    byte_spelling,
    spell,
)

# The metadata this module reads (a GGUF holds more, e.g. scores of SentencePiece vocabularies).
GGUF_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)

# GGUF `tokenizer.ggml.pre` values and the split regex transformers uses for them (None: GPT-2's
# own ByteLevel regex). transformers treats 'smollm' as plain GPT-2 byte-level; we match it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def read_gguf_vocab(fields: Mapping[str, Any], where: str) -> tuple[Backend, dict[str, Any]]:
    """(backend, Tokenizer settings) from decoded `tokenizer.*` metadata; `where` names the file."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NanotuneError(
            f"{where}: GGUF tokenizer model {model!r} is not supported; only byte-level BPE "
            "('gpt2') is; use the model's HF folder with tokenizer.json instead"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_SPLITS:
        raise NanotuneError(
            f"{where}: GGUF pre-tokenizer {pre!r} is not supported (known: "
            f"{', '.join(sorted(GGUF_PRE_SPLITS))}); use the model's HF folder instead"
        )
    tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    # Files without token types mark nothing special (hence the non-strict zips below).
    types: list[int] = fields.get("tokenizer.ggml.token_type", [])
    if not tokens:
        raise NanotuneError(f"{where}: GGUF has no tokenizer.ggml.tokens; it holds no vocabulary")
    hf = byte_level_tokenizer(_vocab(tokens), merges, GGUF_PRE_SPLITS[pre])
    alphabet = set(byte_spelling().values())
    # Control tokens are special; one spelled outside the byte alphabet is a llama.cpp
    # mislabel that transformers skips too (adding it would grow the vocab).
    hf.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _GGUF_CONTROL and set(t) <= alphabet
        ]
    )
    # User-defined tokens (e.g. `<think>`) are matched whole but are not special.
    hf.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _GGUF_USER_DEFINED and hf.token_to_id(t) is not None
        ]
    )
    return _TokenizersBackend(hf), {
        "bos_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_id": fields.get("tokenizer.ggml.eos_token_id"),
        "pad_id": fields.get("tokenizer.ggml.padding_token_id"),
        "chat_template": fields.get("tokenizer.chat_template"),
        "add_bos": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "name": where,
    }


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token → id; tokens written in raw UTF-8 instead of the byte alphabet get respelled."""
    alphabet = set(byte_spelling().values())
    return {t if set(t) <= alphabet else spell(t.encode("utf-8")): i for i, t in enumerate(tokens)}

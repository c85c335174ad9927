"""The byte-level BPE a GGUF file describes in its `tokenizer.ggml.*` metadata, both ways; and,
read only, the SentencePiece BPE of llama.cpp's 'llama' vocabularies (Gemma's).

This module reads and writes no file: the weights loader opens the GGUF once and hands over the
values of the keys in `GGUF_KEYS` already decoded (strings, ints, lists), as `gguf.GGUFReader`
gives them; the GGUF exporter gets the same values back from `gguf_vocab_metadata` to write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from nanotune.errors import NanotuneError
from nanotune.tokenizer.backends import (
    Backend,
    _TokenizersBackend,
    byte_level_tokenizer,
    byte_spelling,
    spell,
)

# The metadata this module reads.
GGUF_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)

# GGUF `tokenizer.ggml.pre` values and the split regex transformers uses for them (None: GPT-2's
# own ByteLevel regex). transformers treats 'smollm' as plain GPT-2 byte-level; we match it.
# llama.cpp's name for GPT-2's split is 'gpt-2'; 'gpt2' (which llama.cpp refuses) is what
# nanotune's first GGUF exports wrote, read back here and written as 'gpt-2'.
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
    "gpt-2": None,
    "gpt2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_LLAMA_CPP_PRE = {"gpt2": "gpt-2"}  # names llama.cpp does not know -> the one it uses
_GGUF_NORMAL, _GGUF_CONTROL, _GGUF_USER_DEFINED = 1, 3, 4


def read_gguf_vocab(fields: Mapping[str, Any], where: str) -> tuple[Backend, dict[str, Any]]:
    """(backend, Tokenizer settings) from decoded `tokenizer.*` metadata; `where` names the file."""
    model = fields.get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece(fields, where)
    if model != "gpt2":
        raise NanotuneError(
            f"{where}: GGUF tokenizer model {model!r} is not supported; byte-level BPE ('gpt2') "
            "and SentencePiece BPE ('llama') are; use the model's HF folder with tokenizer.json"
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
    return _with_added(hf, tokens, types, set(byte_spelling().values())), _settings(
        fields, where, _LLAMA_CPP_PRE.get(pre, pre)
    )


def _with_added(
    hf: HFTokenizer, tokens: list[str], types: list[int], alphabet: set[str] | None
) -> Backend:
    """`hf` with the GGUF's control tokens as special tokens and its user-defined ones matched
    whole; `alphabet`: the characters a token may be spelled in (None: any)."""
    # Control tokens are special; one spelled outside the byte alphabet is a llama.cpp
    # mislabel that transformers skips too (adding it would grow the vocab).
    hf.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _GGUF_CONTROL and (alphabet is None or set(t) <= alphabet)
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
    return _TokenizersBackend(hf)


def _settings(fields: Mapping[str, Any], where: str, gguf_pre: str | None) -> dict[str, Any]:
    return {
        "bos_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_id": fields.get("tokenizer.ggml.eos_token_id"),
        "pad_id": fields.get("tokenizer.ggml.padding_token_id"),
        "chat_template": fields.get("tokenizer.chat_template"),
        "add_bos": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "gguf_pre": gguf_pre,
        "name": where,
    }


def _sentencepiece(fields: Mapping[str, Any], where: str) -> tuple[Backend, dict[str, Any]]:
    """llama.cpp's 'llama' vocabulary (SentencePiece BPE: spaces as '▁', bytes as <0xNN> pieces
    where no piece fits) as a `tokenizers` BPE, as transformers converts it: the merges are every
    split of a piece into two pieces, ranked by the merged piece's score."""
    tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
    scores: list[float] = fields.get("tokenizer.ggml.scores") or []
    types: list[int] = fields.get("tokenizer.ggml.token_type", [])
    if not tokens or len(scores) != len(tokens):
        raise NanotuneError(
            f"{where}: a SentencePiece GGUF vocabulary needs tokenizer.ggml.tokens and as many "
            "tokenizer.ggml.scores; re-convert the file"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        found = [(a, b) for a, b in splits if a in vocab and b in vocab]
        found.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend((a, b, score) for a, b in found)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    hf = HFTokenizer(
        models.BPE(
            vocab,
            [(a, b) for a, b, _ in merges],
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [normalizers.Replace(" ", "▁")]
    if fields.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend("▁"))
    hf.normalizer = normalizers.Sequence(steps)
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if fields.get("tokenizer.ggml.add_space_prefix") else [])
    )
    return _with_added(hf, tokens, types, None), _settings(fields, where, None)


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token → id; tokens written in raw UTF-8 instead of the byte alphabet get respelled."""
    alphabet = set(byte_spelling().values())
    return {t if set(t) <= alphabet else spell(t.encode("utf-8")): i for i, t in enumerate(tokens)}


def gguf_vocab_metadata(
    backend: Backend, settings: Mapping[str, Any], n_vocab: int, where: str
) -> dict[str, Any]:
    """The `tokenizer.*` metadata (keys of `GGUF_KEYS`) that `read_gguf_vocab` reads back to this
    vocabulary, laid out as llama.cpp's convert_hf_to_gguf writes a byte-level BPE.

    `n_vocab`: the embedding's rows; ids the vocabulary leaves unused become `[PAD<id>]`
    user-defined tokens, as llama.cpp pads them. `settings`: bos_id, eos_id, pad_id, add_bos,
    chat_template, gguf_pre (those of `Tokenizer`). The pre-tokenizer name is `gguf_pre` when the
    vocabulary came from a GGUF (its file knows best: SmolLM2's says 'smollm', though transformers
    and nanotune read it as GPT-2's split), else the one tokenizer.json's pre-tokenizer implies.
    """
    hf = backend.to_tokenizers()
    spec = json.loads(hf.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise NanotuneError(
            f"{where}: only byte-level BPE vocabularies can be written to GGUF (this one is a "
            f"{spec['model'].get('type')} model); export it as an HF folder instead"
        )
    vocab = hf.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise NanotuneError(
            f"{where}: the tokenizer has {max(vocab.values()) + 1} ids but the model's embedding "
            f"only {n_vocab} rows; resize the embedding to the tokenizer (train with it) first"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_GGUF_USER_DEFINED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, _GGUF_NORMAL
    for i, added in hf.get_added_tokens_decoder().items():
        types[i] = _GGUF_CONTROL if added.special else _GGUF_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": settings.get("gguf_pre")
        or _gguf_pre(spec.get("pre_tokenizer"), where),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": settings.get("bos_id"),
        "tokenizer.ggml.eos_token_id": settings.get("eos_id"),
        "tokenizer.ggml.padding_token_id": settings.get("pad_id"),
        "tokenizer.ggml.add_bos_token": bool(settings.get("add_bos")),
        "tokenizer.chat_template": settings.get("chat_template"),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _gguf_pre(pre: dict[str, Any] | None, where: str) -> str:
    """The `tokenizer.ggml.pre` name of a tokenizer.json pre-tokenizer: how llama.cpp must split
    text before BPE so that it finds the ids this tokenizer finds."""
    steps = (pre or {}).get("pretokenizers") or [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM's own tokenizer.json: each digit alone, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == GGUF_PRE_SPLITS[name]:
                return name
    raise NanotuneError(
        f"{where}: its pre-tokenizer ({' + '.join(map(str, kinds))}) is none GGUF names (gpt-2, "
        "smollm, llama-bpe, qwen2), so llama.cpp would split text differently; export it as an "
        "HF folder instead"
    )

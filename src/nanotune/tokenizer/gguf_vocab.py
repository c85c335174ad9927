"""The byte-level BPE a GGUF file describes in its `tokenizer.ggml.*` metadata, both ways; and,
read only, the SentencePiece BPE of llama.cpp's 'llama' vocabularies (Gemma's).

This module reads and writes no file: the weights loader opens the GGUF once and hands over the
values of the keys in `GGUF_KEYS` already decoded (strings, ints, lists), as `gguf.GGUFReader`
gives them; the GGUF exporter gets the same values back from `gguf_vocab_metadata` to write.
"""

from __future__ import annotations

import json
import re
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
# llama.cpp's token types (gguf.TokenType).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL = 1, 2, 3
_GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 4, 5, 6
# The scores convert_hf_to_gguf gives SentencePiece tokens that have none of their own: added
# tokens (tokenizer_config.json's added_tokens_decoder) and ids past the vocabulary.
_SPM_ADDED_SCORE = -1000.0
_SPM_UNUSED_SCORE = -10000.0
_SPM_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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
    # The scores themselves, for a GGUF export: the merges keep only their order.
    settings = _settings(fields, where, None) | {"gguf_scores": [float(x) for x in scores]}
    return _with_added(hf, tokens, types, None), settings


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token → id; tokens written in raw UTF-8 instead of the byte alphabet get respelled."""
    alphabet = set(byte_spelling().values())
    return {t if set(t) <= alphabet else spell(t.encode("utf-8")): i for i, t in enumerate(tokens)}


def gguf_vocab_metadata(
    backend: Backend, settings: Mapping[str, Any], n_vocab: int, where: str
) -> dict[str, Any]:
    """The `tokenizer.*` metadata (keys of `GGUF_KEYS`) that `read_gguf_vocab` reads back to this
    vocabulary, laid out as llama.cpp's convert_hf_to_gguf writes it: a byte-level BPE as its
    'gpt2' model, a SentencePiece-style one (BPE with byte fallback, Unigram) as its 'llama' model.

    `n_vocab`: the embedding's rows; ids the vocabulary leaves unused are padded with `[PAD<id>]`
    tokens, as llama.cpp pads them. `settings`: bos_id, eos_id, pad_id, add_bos, chat_template,
    gguf_pre, gguf_scores (those of `Tokenizer`).
    """
    hf = backend.to_tokenizers()
    spec = json.loads(hf.to_str())
    vocab = hf.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise NanotuneError(
            f"{where}: the tokenizer has {max(vocab.values()) + 1} ids but the model's embedding "
            f"only {n_vocab} rows; resize the embedding to the tokenizer (train with it) first"
        )
    if _is_sentencepiece(spec):
        fields = _sentencepiece_metadata(hf, spec, vocab, n_vocab, settings.get("gguf_scores"))
    elif spec["model"].get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == (
        "ByteLevel"
    ):
        fields = _byte_level_metadata(hf, spec, vocab, n_vocab, settings, where)
    else:
        raise NanotuneError(
            f"{where}: a {spec['model'].get('type')} vocabulary that is neither byte-level BPE nor "
            "SentencePiece-style (BPE with byte fallback, or Unigram) has no GGUF tokenizer model; "
            "export it as an HF folder instead"
        )
    fields |= {
        "tokenizer.ggml.bos_token_id": settings.get("bos_id"),
        "tokenizer.ggml.eos_token_id": settings.get("eos_id"),
        "tokenizer.ggml.padding_token_id": settings.get("pad_id"),
        "tokenizer.ggml.add_bos_token": bool(settings.get("add_bos")),
        "tokenizer.chat_template": settings.get("chat_template"),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _byte_level_metadata(
    hf: HFTokenizer,
    spec: dict[str, Any],
    vocab: dict[str, int],
    n_vocab: int,
    settings: Mapping[str, Any],
    where: str,
) -> dict[str, Any]:
    """llama.cpp's 'gpt2' model. The pre-tokenizer name is `gguf_pre` when the vocabulary came
    from a GGUF (its file knows best: SmolLM2's says 'smollm', though transformers and nanotune
    read it as GPT-2's split), else the one tokenizer.json's pre-tokenizer implies."""
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_GGUF_USER_DEFINED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, _GGUF_NORMAL
    for i, added in hf.get_added_tokens_decoder().items():
        types[i] = _GGUF_CONTROL if added.special else _GGUF_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": settings.get("gguf_pre")
        or _gguf_pre(spec.get("pre_tokenizer"), where),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
    }


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer.json describes a SentencePiece-style model: Unigram, or BPE over
    characters that falls back to <0xNN> byte pieces (Llama 2's, Mistral's, Phi-3's, Gemma's)."""
    model = spec["model"]
    if model.get("type") == "Unigram":
        return True
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _sentencepiece_metadata(
    hf: HFTokenizer,
    spec: dict[str, Any],
    vocab: dict[str, int],
    n_vocab: int,
    source_scores: list[float] | None = None,
) -> dict[str, Any]:
    """llama.cpp's 'llama' model, as convert_hf_to_gguf's `_create_vocab_sentencepiece` writes it
    from tokenizer.model and tokenizer_config.json: every id a piece, a score and a type.

    Types: added special tokens are control, other added tokens user-defined (their '▁' written
    as spaces: llama.cpp matches them in the raw text), <0xNN> pieces bytes, the model's unknown
    piece unknown (control when it is an added special token, as Gemma's), the rest normal.
    Scores: added tokens -1000; ids past the vocabulary (and llama.cpp's `[PAD<id>]` padding of a
    GGUF read back) -10000, type unused; byte and unknown pieces 0; normal pieces a Unigram's own
    log-probabilities, a BPE's the priority llama.cpp merges by (see `_bpe_scores`).
    `source_scores`: the scores of the GGUF the vocabulary was read from, written back as they
    were for the ids it had."""
    model = spec["model"]
    added = hf.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [_SPM_UNUSED_SCORE] * n_vocab
    types = [_GGUF_UNUSED] * n_vocab
    if model["type"] == "Unigram":
        unk = model.get("unk_id")
        own = {i: float(score) for i, (_, score) in enumerate(model["vocab"])}
    else:
        unk = vocab.get(model.get("unk_token") or "")
        own = {}
    normal = []
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        tokens[i] = token
        if i in added:
            kind = _GGUF_CONTROL if added[i].special else _GGUF_USER_DEFINED
            if kind == _GGUF_USER_DEFINED:
                tokens[i] = token.replace("▁", " ")
            types[i], scores[i] = kind, _SPM_ADDED_SCORE
        elif token == f"[PAD{i}]":  # llama.cpp's padding, read back from a GGUF
            continue
        elif i == unk:
            types[i], scores[i] = _GGUF_UNKNOWN, own.get(i, 0.0)
        elif model.get("byte_fallback") and _SPM_BYTE.fullmatch(token):
            types[i], scores[i] = _GGUF_BYTE, own.get(i, 0.0)
        else:
            types[i] = _GGUF_NORMAL
            normal.append(i)
    if model["type"] == "BPE":
        own = _bpe_scores(vocab, model["merges"], normal)
    for i in normal:
        scores[i] = own[i]
    if source_scores is not None:
        scores[: len(source_scores)] = source_scores[:n_vocab]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": unk,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": _adds_space_prefix(spec),
    }


def _bpe_scores(
    vocab: dict[str, int], merges: list[str] | list[list[str]], normal: list[int]
) -> dict[int, float]:
    """Scores for a BPE's normal pieces under which llama.cpp's SentencePiece tokenizer (merge the
    adjacent pair whose joined piece scores highest) merges in the BPE's order.

    A SentencePiece BPE numbers its pieces in the order it learned them and scores each minus
    its rank (Gemma's first normal piece, id 494, scores 0, the next -1, ...), and transformers'
    converter ranks the merges by that score: when the ids follow the merges so, each normal
    piece scores minus its rank among the normal pieces, in the order of the model's own scores
    (equal to them where no piece was moved out of its place). Otherwise a piece scores minus the
    rank of the first merge that makes it, and pieces no merge makes (single characters, which
    llama.cpp never merges into) score below all of those. Only the order matters to llama.cpp."""
    first: dict[int, int] = {}
    for rank, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(a + b)
        if i is not None:
            first.setdefault(i, rank)
    made = [i for i in normal if i in first]
    if all(first[x] < first[y] for x, y in zip(made, made[1:], strict=False)):
        return {i: -float(k) for k, i in enumerate(normal)}
    return {i: -float(first.get(i, len(merges) + k)) for k, i in enumerate(normal)}


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the text (SentencePiece's add_dummy_prefix): a
    Prepend('▁') normalizer (transformers' older Llama conversion, nanotune's GGUF reader) or a
    Metaspace pre-tokenizer that prepends (its newer one)."""

    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        part = part or {}
        return part.get(key) or [part]

    if any(
        s.get("type") == "Prepend" and s.get("prepend") == "▁"
        for s in steps(spec.get("normalizer"), "normalizers")
    ):
        return True
    return any(
        s.get("type") == "Metaspace"
        and s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never")
        != "never"
        for s in steps(spec.get("pre_tokenizer"), "pretokenizers")
    )


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

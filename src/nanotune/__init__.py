"""nanotune: fine-tune GPT-2 and other small language models."""

from nanotune.errors import NanotuneError

__all__ = ["NanotuneError", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `nanotune.train("recipe.yaml")` without importing torch at `import nanotune`: the train
    # package loads on first use and is itself callable (see nanotune/train/__init__.py).
    if name == "train":
        import importlib

        return importlib.import_module("nanotune.train")
    raise AttributeError(f"module 'nanotune' has no attribute {name!r}")

"""nanotune: fine-tune GPT-2 and other small language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nanotune.errors import NanotuneError
from nanotune.version import __version__

if TYPE_CHECKING:
    from nanotune.jobs.finetune import RunResult

__all__ = ["NanotuneError", "__version__", "train"]


def train(config: Any, **kwargs: Any) -> RunResult:
    """Run one fine-tuning job: `nanotune.train("recipe.yaml")`, or from Python objects:
    `nanotune.train({"data": {"format": "chat"}}, data={"train": rows})`; see
    `nanotune.jobs.finetune.train`.

    Imports torch on first use only, so `import nanotune` stays light.
    """
    from nanotune.jobs.finetune import train as run

    return run(config, **kwargs)

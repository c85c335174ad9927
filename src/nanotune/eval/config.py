"""EvalConfig: what to measure, on which split, and how to generate."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal, get_args

from nanotune.errors import NanotuneError
from nanotune.generate import MAX_NEW_TOKENS

Metric = Literal[
    "perplexity", "accuracy", "preference", "exact_match", "squad", "tag_f1", "tool_call", "reward"
]
# Metric name -> what it needs. LM metrics read batches, generation metrics read model outputs.
METRICS = {
    "perplexity": "LM batches: loss and perplexity on the supervised tokens",
    "accuracy": "classification: accuracy, macro-F1, per-class precision/recall/F1, confusion",
    "preference": "preference pairs: how often the model ranks chosen above rejected (a policy "
    "by summed log-prob, a reward model by score), and the mean margin",
    "exact_match": "generation: the generation equals the reference (whitespace-trimmed)",
    "squad": "generation: SQuAD exact match and token F1 (official normalisation)",
    "tag_f1": "generation: comma-separated tag-set precision/recall/F1 (micro and macro)",
    "tool_call": "generation: the tool calls parsed from the answer (Hermes/Qwen <tool_call> "
    "JSON) equal the reference's, names and arguments; and how often the names alone do",
    "reward": "generation: mean score of a Hugging Face reward model (needs reward_model)",
}
assert tuple(METRICS) == get_args(Metric)
GENERATION_METRICS = ("exact_match", "squad", "tag_f1", "tool_call", "reward")


@dataclass
class EvalConfig:
    """How a model is evaluated before and after training (the `eval:` section of a recipe)."""

    metrics: list[Metric] = field(default_factory=lambda: ["perplexity"])
    """What to measure (perplexity, also written ppl; see `nanotune.eval.METRICS`)."""
    split: Literal["train", "val", "test"] = "val"
    """Which data split to evaluate on."""
    max_examples: int | None = 200
    """Evaluate at most this many examples; null = the whole split."""
    batch_size: int = 8
    """Examples per forward pass (and per generation batch)."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Generation budget per example for the generation metrics."""
    greedy: bool = True
    """Decode greedily; false = sample at `temperature` with `seed`."""
    temperature: float = 0.7
    """Sampling temperature when not greedy."""
    seed: int = 0
    """Sampling seed when not greedy (reproducible generations)."""
    num_samples: int = 5
    """How many (prompt, reference, generations) samples to keep for the report."""
    reward_model: str | None = None
    """Hugging Face id or local folder of a sequence-classification reward model (`reward`)."""

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        for name in self.metrics:
            if name not in METRICS:
                close = difflib.get_close_matches(name, METRICS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise NanotuneError(
                    f"eval.metrics: unknown metric {name!r}; {hint}valid: {', '.join(METRICS)}"
                )
        if not self.metrics:
            raise NanotuneError(f"eval.metrics: empty; choose from {', '.join(METRICS)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise NanotuneError(
                f"eval.max_examples: {self.max_examples} must be ≥ 1 (or null for all)"
            )
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise NanotuneError(f"eval.{name}: {getattr(self, name)} must be ≥ 1")
        if self.num_samples < 0:
            raise NanotuneError(f"eval.num_samples: {self.num_samples} must be ≥ 0")
        if not self.greedy and self.temperature <= 0:
            raise NanotuneError(
                f"eval.temperature: {self.temperature} must be > 0 when greedy is false"
            )
        if "reward" in self.metrics and not self.reward_model:
            raise NanotuneError(
                "eval.reward_model: the 'reward' metric needs a reward model "
                "(a Hugging Face id or a local folder)"
            )

    @property
    def generation_metrics(self) -> list[str]:
        return [m for m in self.metrics if m in GENERATION_METRICS]

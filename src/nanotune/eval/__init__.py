"""Evaluation: metrics, evaluators, before/after comparison and the HTML report.

Knows models, tokenizers and batches only through their documented interfaces, never training.
"""

from nanotune.eval.compare import compare, compare_rows
from nanotune.eval.config import METRICS, EvalConfig
from nanotune.eval.evaluate import (
    Generations,
    classification_eval,
    generate_for_eval,
    generation_metrics,
    perplexity,
    samples,
    split_prompt,
)
from nanotune.eval.report import RunSummary, write_report
from nanotune.eval.reward import RewardModel, compare_rewards
from nanotune.eval.run import BeforeAfter, compare_models, evaluate_before_after, evaluate_model

__all__ = [
    "BeforeAfter",
    "compare_models",
    "evaluate_before_after",
    "evaluate_model",
    "METRICS",
    "EvalConfig",
    "Generations",
    "RewardModel",
    "RunSummary",
    "classification_eval",
    "compare",
    "compare_rewards",
    "compare_rows",
    "generate_for_eval",
    "generation_metrics",
    "perplexity",
    "samples",
    "split_prompt",
    "write_report",
]

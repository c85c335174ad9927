"""Evaluation: metrics, evaluators, before/after comparison and the HTML report.

Knows models, tokenizers and batches only through their documented interfaces, never training.
"""

from __future__ import annotations

from nanotune.eval.compare import compare, compare_rows
from nanotune.eval.config import METRICS, EvalConfig
from nanotune.lazy import lazy_exports

# The torch-using modules load on first use: the config (and `nanotune --help`) stays light.
_LAZY = {
    "Generations": "evaluate",
    "classification_eval": "evaluate",
    "generate_for_eval": "evaluate",
    "generation_metrics": "evaluate",
    "perplexity": "evaluate",
    "samples": "evaluate",
    "split_prompt": "evaluate",
    "RunSummary": "report",
    "write_report": "report",
    "RewardModel": "reward",
    "compare_rewards": "reward",
    "BeforeAfter": "run",
    "compare_models": "run",
    "evaluate_before_after": "run",
    "evaluate_model": "run",
}

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

__getattr__ = lazy_exports(__name__, _LAZY)

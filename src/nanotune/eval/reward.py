"""Score responses with any Hugging Face sequence-classification reward model.

`transformers` is an optional extra (`pip install nanotune[hf]`), imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class RewardModel:
    """A reward model from a hub id or local folder: `score(prompts, responses) -> list[float]`.

    The score is the single logit of a one-output head (the usual reward model); for heads with
    several classes, the log-probability of the last class (the "good" label by convention).
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu") -> None:
        from nanotune.errors import NanotuneError

        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise NanotuneError(
                "reward scoring needs transformers: pip install 'nanotune[hf]'"
            ) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise NanotuneError(
                f"reward model {name_or_path!r} could not be loaded ({str(e).splitlines()[0]}); "
                "pass a local folder with a sequence-classification model, or download it online"
            ) from e
        if self.tokenizer.pad_token is None:  # GPT-2-style reward models: pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8
    ) -> list[float]:
        """One score per (prompt, response), encoded as a text pair as reward models expect."""
        scores: list[float] = []
        for i in range(0, len(prompts), batch_size):
            enc = self.tokenizer(
                list(prompts[i : i + batch_size]),
                list(responses[i : i + batch_size]),
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                scores += logits[:, 0].tolist()
            else:
                scores += logits.log_softmax(-1)[:, -1].tolist()
        return scores


def compare_rewards(
    reward: RewardModel | Any,
    prompts: Sequence[str],
    before: Sequence[str],
    after: Sequence[str],
    batch_size: int = 8,
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean reward of base and fine-tuned responses to the same prompts, and the win rate.

    Win rate: fraction of prompts where the fine-tuned response scores higher (ties count half).
    """
    if not prompts:
        raise ValueError("compare_rewards needs at least one prompt")
    b = reward.score(prompts, before, batch_size)
    a = reward.score(prompts, after, batch_size)
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True))
    n = len(prompts)
    return {"reward": sum(b) / n}, {"reward": sum(a) / n, "reward_win_rate": wins / n}

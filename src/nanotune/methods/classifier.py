"""Sequence classification head over the decoder, pooling the last real token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.models.linear import Linear
from nanotune.models.transformer import Transformer

REWARD_LABEL = "reward"
"""The one label of a reward model: its single output is the score."""


class SequenceClassifier(nn.Module):
    """`score(hidden at the last non-pad token)`, as Hugging Face's GPT2ForSequenceClassification.
    With one output it is a reward model (labels [REWARD_LABEL]).

    Rows are right-padded (docs/design.md), so the state at index `lengths - 1` has seen exactly
    the real tokens: causal attention keeps the pads after it out of its view.
    """

    def __init__(
        self, body: Transformer, num_labels: int, label_names: list[str] | None = None
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise NanotuneError(
                f"a classifier needs at least 1 output (a reward model), got num_labels={num_labels}"
            )
        names = [str(i) for i in range(num_labels)] if label_names is None else list(label_names)
        if len(names) != num_labels:
            raise NanotuneError(
                f"label_names has {len(names)} names for num_labels={num_labels}; give one per label"
            )
        self.body = body
        self.label_names = names
        self.score = Linear(
            body.config.n_embd,
            num_labels,
            bias=False,
            device=body.device,
            dtype=body.wte.weight.dtype,
        )
        nn.init.normal_(self.score.weight, std=0.02)

    @property
    def config(self):
        return self.body.config

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def forward(self, input_ids: Tensor, lengths: Tensor, **layout: Tensor) -> Tensor:
        """Logits [B, num_labels] at the last real token of each row (lengths [B], >= 1).

        lengths [B, k]: rows holding k sequences (a preference pair's chosen and rejected,
        laid out by `layout`: `hidden()`'s positions and branch_ids) end at these indices + 1;
        logits [B, k, num_labels].
        """
        h = self.body.hidden(input_ids, **layout)
        last = lengths.to(h.device) - 1
        rows = torch.arange(h.shape[0], device=h.device).view(-1, *[1] * (last.dim() - 1))
        return self.score(h[rows, last].to(self.score.weight.dtype))

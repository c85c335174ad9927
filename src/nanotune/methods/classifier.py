"""Sequence classification head over the decoder, pooling the last real token."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.models.linear import Linear
from nanotune.models.transformer import Transformer


class PrefixStates(Protocol):
    """Where a classifier keeps its frozen prefix's states (`training.prefix.PrefixStore`)."""

    def get(self, input_ids: Tensor, lengths: Tensor) -> Tensor | None: ...

    def put(self, input_ids: Tensor, lengths: Tensor, states: Tensor) -> None: ...


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
                "a classifier needs at least 1 output (a reward model), "
                f"got num_labels={num_labels}"
            )
        names = [str(i) for i in range(num_labels)] if label_names is None else list(label_names)
        if len(names) != num_labels:
            raise NanotuneError(
                f"label_names has {len(names)} names for num_labels={num_labels}; "
                "give one per label"
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
        self._prefix: PrefixStates | None = None
        self._prefix_layers = 0

    @property
    def config(self):
        return self.body.config

    @property
    def num_labels(self) -> int:
        return self.score.out_features

    def frozen_prefix_layers(self) -> tuple[int, str]:
        """How many leading blocks compute states that cannot change in training (their
        weights and the embeddings frozen, no dropout), at most all but the last; and, when
        frozen blocks cannot be used so, why."""
        body = self.body
        embeddings = [body.wte, *([body.wpe] if body.wpe is not None else [])]
        if any(p.requires_grad for m in embeddings for p in m.parameters()):
            return 0, ""
        n = 0
        while n < len(body.blocks) - 1 and not any(
            p.requires_grad for p in body.blocks[n].parameters()
        ):
            n += 1
        if n and body.config.dropout:
            return 0, f"dropout {body.config.dropout:g} makes its states differ at every pass"
        return n, ""

    def cache_frozen_prefix(self, store: PrefixStates | None) -> int:
        """Read the frozen leading blocks' states from `store` (None: compute them again, as
        by default); returns how many blocks it covers (0: none are frozen, so it is not used)."""
        n = self.frozen_prefix_layers()[0] if store is not None else 0
        self._prefix, self._prefix_layers = (store, n) if n else (None, 0)
        return n

    def forward(self, input_ids: Tensor, lengths: Tensor, **layout: Tensor) -> Tensor:
        """Logits [B, num_labels] at the last real token of each row (lengths [B], >= 1).

        lengths [B, k]: rows holding k sequences (a preference pair's chosen and rejected,
        laid out by `layout`: `hidden()`'s positions and branch_ids) end at these indices + 1;
        logits [B, k, num_labels].
        """
        if layout or lengths.dim() > 1:
            h = self.body.hidden(input_ids, **layout)
            last = lengths.to(h.device) - 1
            rows = torch.arange(h.shape[0], device=h.device).view(-1, *[1] * (last.dim() - 1))
            return self.score(h[rows, last].to(self.score.weight.dtype))
        h = self.body.norm(self._pooled(input_ids, lengths))
        return self.score(h.to(self.score.weight.dtype))

    def _pooled(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """The last block's output [B, C] at each row's last real token: only that position's
        query, attention output and MLP are computed there (keys and values at all of them).
        The frozen prefix's states come from the store when it has every row of the batch."""
        body, k = self.body, self._prefix_layers
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self._prefix.get(input_ids, lengths) if k else None
        if x is None:
            x, rope = body.embed(input_ids, positions)
            if k:
                with torch.no_grad():  # frozen: nothing to record for the backward pass
                    x = body.run_blocks(x, rope, None, None, range(k))
                self._prefix.put(input_ids, lengths, x)
        else:
            rope = body.rope(positions, x.dtype)
        last = lengths.to(input_ids.device) - 1
        return body.run_blocks(x, rope, None, None, range(k, len(body.blocks)), query_at=last)

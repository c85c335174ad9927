"""Objectives: summed losses, label counts and evaluation metrics over the batch contract.

Losses are sums; the trainer divides by the label count of the whole accumulated batch, so
micro-batches with few labels are not over-weighted (transformers#35203).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = dict[str, object]
IGNORE = -100


class Objective(Protocol):
    """What the trainer needs to know about a task, and nothing about the model family.

    An objective may also define `loss_and_sums(model, batch) -> (loss_sum, {name: sum})`: the
    loss of `loss_sum` and, from the same forward, detached sums over the units `count` counts;
    the trainer then runs it instead of `loss_sum` and logs each sum's mean over the step's
    units under its name (PreferenceObjective: reward_accuracy, reward_margin, logps_chosen...).
    """

    name: str

    def loss_sum(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def count(self, batch: Batch) -> int: ...

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]: ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]: ...


_CE_ROWS = 32


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of [N, V] logits against N targets (none ignored).

    Same value as `F.cross_entropy(..., reduction="sum")` with two fewer vocabulary-sized
    passes: forward keeps log-sum-exp per row instead of writing log-probabilities, and backward
    turns the logits' own buffer into softmax - one_hot instead of allocating, zero-filling and
    scattering a new one. The logits must be this loss's alone (the LM head's output is: a
    linear's backward never reads its output), and the graph is backpropagated once.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = _row_logsumexp(logits)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - _target_logits(logits, targets)).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        n = len(targets)
        _softmax_minus_one_hot(logits, targets, lse, grad.expand(n, 1), grad.expand(n))
        return logits, None


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy in float32 (bf16 logits are read in float32 block by block); fused
    (see `_CrossEntropySum`) when it is trained."""
    if torch.is_grad_enabled() and logits.requires_grad and logits.numel():
        return _CrossEntropySum.apply(_fused_dtype(logits), targets)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class _TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits)[i, targets[i]] per row, with `_CrossEntropySum`'s economy: forward keeps
    log-sum-exp per row, backward turns the logits' own buffer into grad * (one_hot - softmax).
    The same ownership rule holds: the logits are this function's alone, backpropagated once."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = _row_logsumexp(logits)
        ctx.save_for_backward(logits, targets, lse)
        return _target_logits(logits, targets) - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        _softmax_minus_one_hot(logits, targets, lse, -grad[:, None], -grad)
        return logits, None


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of each target under [N, V] logits, in float32 at least (bf16 logits are
    read in float32 block by block); fused when trained."""
    if torch.is_grad_enabled() and logits.requires_grad and logits.numel():
        return _TokenLogProbs.apply(_fused_dtype(logits), targets)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return _target_logits(logits, targets) - _row_logsumexp(logits)


def _fused_dtype(logits: Tensor) -> Tensor:
    """What the fused losses take as is: float32/64 and bfloat16 (the LM head's output under
    bf16 autocast, whose float32 copy would be one more vocabulary-sized pass each way)."""
    if logits.dtype in (torch.float32, torch.float64, torch.bfloat16):
        return logits
    return logits.float()


def _target_logits(logits: Tensor, targets: Tensor) -> Tensor:
    wide = torch.promote_types(logits.dtype, torch.float32)
    return logits.gather(1, targets[:, None]).squeeze(1).to(wide)


def _row_logsumexp(logits: Tensor) -> Tensor:
    """log-sum-exp per row, at least float32, by blocks of rows: torch's logsumexp allocates
    vocabulary-sized temporaries, which stay in cache at this size (3x faster than one call over
    1k x 50k logits); a bf16 block is read in float32."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    return torch.cat([torch.logsumexp(rows.to(wide), dim=-1) for rows in logits.split(_CE_ROWS)])


def _softmax_minus_one_hot(
    logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, at_target: Tensor
) -> None:
    """logits <- softmax(logits) * scale - one_hot(targets) * at_target in place (scale [N, 1],
    at_target [N]), block by block, a bf16 block computed in float32 and stored back: the
    gradient of both fused losses."""
    blocks = zip(
        *(t.split(_CE_ROWS) for t in (logits, lse, targets, scale, at_target)), strict=True
    )
    for rows, row_lse, row_targets, row_scale, row_at in blocks:
        block = rows.to(lse.dtype)
        block.sub_(row_lse[:, None]).exp_().mul_(row_scale)
        block[torch.arange(len(row_targets), device=block.device), row_targets] -= row_at
        if block is not rows:
            rows.copy_(block)


def lm_loss_sum(model: nn.Module, batch: Batch) -> Tensor:
    """Summed next-token cross-entropy, computing the LM head only on rows with a target.

    `batch` follows the LM contract: `input_ids`, shifted `targets` (-100: no loss) and, for
    packed batches, `positions` and `doc_ids`. Prompt and padding positions never pay for a
    vocabulary-sized matmul.
    """
    targets = batch["targets"]
    h = model.hidden(
        batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids")
    )
    keep = targets != IGNORE
    logits = model.lm_head(h[keep])
    return cross_entropy_sum(logits, targets[keep])


class LMObjective:
    """Causal language modelling: loss and perplexity per supervised token."""

    name = "lm"

    def loss_sum(self, model: nn.Module, batch: Batch) -> Tensor:
        return lm_loss_sum(model, batch)

    def count(self, batch: Batch) -> int:
        return int((batch["targets"] != IGNORE).sum())

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        return {"loss": float(lm_loss_sum(model, batch)), "n": self.count(batch)}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / max(1, sums["n"])
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


class ClassificationObjective:
    """Sequence classification: `model(input_ids, lengths)` gives logits [B, num_labels]."""

    name = "classification"

    def loss_sum(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(batch["input_ids"], batch["lengths"])
        return F.cross_entropy(logits.float(), batch["class_labels"], reduction="sum")

    def count(self, batch: Batch) -> int:
        return len(batch["class_labels"])

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        logits = model(batch["input_ids"], batch["lengths"]).float()
        labels = batch["class_labels"]
        return {
            "loss": float(F.cross_entropy(logits, labels, reduction="sum")),
            "correct": int((logits.argmax(-1) == labels).sum()),
            "n": len(labels),
        }

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(1, sums["n"])
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}


# By task name, as the data pipeline decides it (`Datasets.task`); the loop imports no data code.
OBJECTIVES: dict[str, type[Objective]] = {
    LMObjective.name: LMObjective,
    ClassificationObjective.name: ClassificationObjective,
}


def objective_for(task: str) -> Objective:
    """The objective of a task: "lm" or "classification"."""
    if task not in OBJECTIVES:
        raise ValueError(f"no objective for task {task!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[task]()


TOKEN_KEYS = ("input_ids", "targets", "positions", "doc_ids", "branch_ids")
"""Batch tensors whose last dimension is the token one."""


@torch.no_grad()
def trim_padding(batch: Batch) -> Batch:
    """Drop trailing columns that cannot change the loss (rows are right-padded, attention causal).

    Slicing a padded global batch into micro-batches leaves columns that are padding in every
    row of the slice; cutting them recovers per-micro-batch dynamic padding. Tokens are the last
    dimension of the TOKEN_KEYS tensors (preference targets are [B, 2, T]).
    """
    ids = batch["input_ids"]
    if "lengths" in batch:
        end = int(batch["lengths"].max())
    else:
        cols = (batch["targets"] != IGNORE).flatten(0, -2).any(0).nonzero()
        end = int(cols[-1]) + 1 if len(cols) else 1
    if end >= ids.shape[-1]:
        return batch
    return {k: v[..., :end] if k in TOKEN_KEYS else v for k, v in batch.items()}

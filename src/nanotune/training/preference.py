"""Preference objectives: DPO (sigmoid, IPO, hinge; label smoothing), SimPO, ORPO and the
Bradley–Terry reward loss, as pure functions of per-response log-probabilities or rewards, and
the Objective that computes them over preference batches.

A preference batch (`data.batching.collate_preference`) holds pair b in row b: its prompt,
computed once, then its chosen and its rejected response, which attend to the prompt and to
themselves only; the LM head runs only where a response token is predicted. Every loss here is
per pair ([B]); the objective sums them and the trainer divides by the pairs of the whole step (a
mean, as TRL's).

The DPO reference policy comes from the batch (`ref_logps`, computed before training for full
fine-tuning: `reference_logps`) or from `reference(model)`, a context manager under which the
model is the reference (with LoRA: the adapters switched off); it is never a second model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanotune.training.losses import IGNORE, Batch, token_logprobs

DPOLoss = Literal["sigmoid", "ipo", "hinge"]
ObjectiveName = Literal["dpo", "simpo", "orpo", "reward"]


# ---- log-probabilities ---------------------------------------------------------------------


def layout(batch: Batch) -> dict[str, Tensor]:
    """The `hidden()` arguments that lay a preference batch's pairs out (one row per pair)."""
    return {"positions": batch["positions"], "branch_ids": batch["branch_ids"]}


def response_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each response and its token count, both [B, 2] (chosen, rejected).

    One forward of the B pair rows; hidden states are gathered at the positions that predict a
    response token before the LM head, so prompt and padding never pay for vocabulary logits.
    """
    targets = batch["targets"]  # [B, 2, T]
    B = targets.shape[0]
    h = model.hidden(batch["input_ids"], **layout(batch))
    keep = targets != IGNORE
    row, response, position = keep.nonzero(as_tuple=True)
    logps = token_logprobs(model.lm_head(h[row, position]), targets[keep])
    sums = torch.zeros(B * 2, dtype=logps.dtype, device=logps.device)
    sums = sums.index_add(0, row * 2 + response, logps)
    return sums.view(B, 2), keep.sum(2)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # the reference is deterministic: no dropout
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    batches: Iterable[Batch],
    reference: Callable[[nn.Module], AbstractContextManager] | None = None,
) -> Tensor:
    """[N, 2] summed response log-probabilities of every pair of `batches`, in order, under the
    model as it is now (or under `reference(model)`); computed once, before training."""
    out = []
    context = reference or (lambda m: contextlib.nullcontext())
    with _eval_mode(model), context(model):
        for batch in batches:
            out.append(response_logps(model, batch)[0].cpu())
    return torch.cat(out)


# ---- losses, per pair ------------------------------------------------------------------------


def dpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss: DPOLoss = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> Tensor:
    """DPO (Rafailov et al. 2023) per pair, from summed response log-probs of policy and reference.

    h = (chosen - ref_chosen) - (rejected - ref_rejected), the implicit rewards' difference / beta.
    sigmoid: -logsigmoid(beta h); with label_smoothing e, conservative DPO (Mitchell 2023):
        -(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h).
    hinge: relu(1 - beta h) (SLiC).
    ipo: (h' - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17) where h' uses log-probs averaged per
        response token (needs chosen_tokens, rejected_tokens), as TRL computes it.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the token counts of both responses")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
            min=1
        )
        return (h - 1 / (2 * beta)) ** 2
    h = chosen_ratio - rejected_ratio
    if loss == "hinge":
        return torch.relu(1 - beta * h)
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    raise ValueError(f"unknown DPO loss {loss!r}; use sigmoid, ipo or hinge")


def simpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO (Meng et al. 2024) per pair: no reference; the reward is beta times the log-prob
    per response token, and the chosen reward must beat the rejected one by a margin gamma:
    -logsigmoid(beta (chosen/|yc| - rejected/|yr|) - gamma) (label smoothing as in DPO)."""
    z = beta * (chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1))
    z = z - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    lam: float = 0.1,
) -> Tensor:
    """ORPO (Hong et al. 2024) per pair: no reference; the chosen response's NLL per token plus
    lam times the odds-ratio loss -logsigmoid(log odds(chosen) - log odds(rejected)), where
    odds(y) = p / (1 - p) with p the per-token-averaged probability of y (eqs. 4 and 7).

    The NLL is each pair's own mean over its chosen tokens (TRL takes one token mean over the
    batch; the two agree when responses are equally long)."""
    avg_chosen = chosen / chosen_tokens.clamp(min=1)
    avg_rejected = rejected / rejected_tokens.clamp(min=1)
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    return -avg_chosen - lam * F.logsigmoid(log_odds)


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Reward-model loss per pair (Bradley–Terry; Ouyang et al. 2022):
    -logsigmoid(r_chosen - r_rejected - margin), margin 0 unless given (Llama 2's)."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def pair_sums(
    losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, logps: Tensor | None
) -> dict[str, float]:
    """Sums over pairs for the metrics: loss, reward accuracy (chosen > rejected), reward
    margin, chosen/rejected rewards and (policies) response log-probs; `summarize_pairs` means
    them."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    sums = {
        "loss": float(losses.detach().sum()),
        "correct": float((chosen_rewards > rejected_rewards).sum()),
        "margin": float((chosen_rewards - rejected_rewards).sum()),
        "rewards_chosen": float(chosen_rewards.sum()),
        "rewards_rejected": float(rejected_rewards.sum()),
        "n": len(losses),
    }
    if logps is not None:
        logps = logps.detach()
        sums.update(logps_chosen=float(logps[:, 0].sum()), logps_rejected=float(logps[:, 1].sum()))
    return sums


def summarize_pairs(sums: dict[str, float]) -> dict[str, float]:
    n = max(1.0, sums["n"])
    out = {
        "loss": sums["loss"] / n,
        "reward_accuracy": sums["correct"] / n,
        "reward_margin": sums["margin"] / n,
        "rewards_chosen": sums["rewards_chosen"] / n,
        "rewards_rejected": sums["rewards_rejected"] / n,
    }
    for k in ("logps_chosen", "logps_rejected"):
        if k in sums:
            out[k] = sums[k] / n
    return out


# ---- the objective ---------------------------------------------------------------------------


class PreferenceObjective:
    """DPO, SimPO or ORPO of a policy (`model.hidden`/`model.lm_head`), or the Bradley–Terry loss
    of a reward model (`model(input_ids, lengths)` -> [N, 1] scores), over preference batches.

    reference: DPO only, for batches without `ref_logps`: a context manager factory under which
        the model is the reference policy (`methods.lora.adapters_disabled`).
    """

    name = "preference"

    def __init__(
        self,
        objective: ObjectiveName = "dpo",
        *,
        beta: float = 0.1,
        loss: DPOLoss = "sigmoid",
        label_smoothing: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.1,
        reference: Callable[[nn.Module], AbstractContextManager] | None = None,
    ) -> None:
        if objective not in ("dpo", "simpo", "orpo", "reward"):
            raise ValueError(f"unknown preference objective {objective!r}")
        self.objective = objective
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        self.gamma, self.lam = gamma, lam
        self.reference = reference

    @property
    def needs_ref_logps(self) -> bool:
        """DPO with no reference context: every batch must carry `ref_logps` (precomputed)."""
        return self.objective == "dpo" and self.reference is None

    @property
    def scores_sequences(self) -> bool:
        """A reward model: its body's LM head takes no part in the loss."""
        return self.objective == "reward"

    def _reference(self, model: nn.Module, batch: Batch) -> Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.reference is None:
            raise ValueError("DPO needs ref_logps in the batch or a reference context")
        with torch.no_grad(), _eval_mode(model), self.reference(model):
            return response_logps(model, batch)[0]

    def pairs(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Per pair: losses, chosen rewards, rejected rewards, response log-probs [B, 2] or None."""
        if self.objective == "reward":
            scores = model(batch["input_ids"], batch["ends"], **layout(batch))
            rewards = scores.float().squeeze(-1)  # [B, 2]
            losses = bradley_terry_loss(rewards[:, 0], rewards[:, 1])
            return losses, rewards[:, 0], rewards[:, 1], None
        logps, tokens = response_logps(model, batch)
        chosen, rejected = logps[:, 0], logps[:, 1]
        n_chosen, n_rejected = tokens[:, 0], tokens[:, 1]
        if self.objective == "dpo":
            ref = self._reference(model, batch).to(logps.dtype)
            losses = dpo_loss(
                chosen,
                rejected,
                ref[:, 0],
                ref[:, 1],
                beta=self.beta,
                loss=self.loss,
                label_smoothing=self.label_smoothing,
                chosen_tokens=n_chosen,
                rejected_tokens=n_rejected,
            )
            # The implicit rewards beta * log(pi / pi_ref), as TRL reports them.
            rewards = self.beta * (logps - ref)
        elif self.objective == "simpo":
            losses = simpo_loss(
                chosen,
                rejected,
                n_chosen,
                n_rejected,
                beta=self.beta,
                gamma=self.gamma,
                label_smoothing=self.label_smoothing,
            )
            rewards = self.beta * logps / tokens.clamp(min=1)
        else:
            losses = orpo_loss(chosen, rejected, n_chosen, n_rejected, lam=self.lam)
            rewards = self.lam * logps / tokens.clamp(min=1)
        return losses, rewards[:, 0].detach(), rewards[:, 1].detach(), logps

    def loss_sum(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.pairs(model, batch)[0].sum()

    def loss_and_sums(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """`loss_sum` and, from the same forward, the sums over pairs the trainer logs as each
        step's means: reward accuracy (chosen > rejected), reward margin, chosen/rejected
        rewards and (policies) response log-probs. Tensors, so no micro-step waits on them."""
        losses, chosen, rejected, logps = self.pairs(model, batch)
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        sums = {
            "reward_accuracy": (chosen > rejected).float().sum(),
            "reward_margin": (chosen - rejected).sum(),
            "rewards_chosen": chosen.sum(),
            "rewards_rejected": rejected.sum(),
        }
        if logps is not None:
            logps = logps.detach().float()
            sums |= {"logps_chosen": logps[:, 0].sum(), "logps_rejected": logps[:, 1].sum()}
        return losses.sum(), sums

    def count(self, batch: Batch) -> int:
        return len(batch["input_ids"])  # pairs

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        return pair_sums(*self.pairs(model, batch))

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return summarize_pairs(sums)

"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative policy optimisation with verifiable
rewards.

Each step samples `num_generations` (G) completions per prompt from the policy being trained,
through the continuous-batching decoding engine on the live model (its LoRA layers included: no
weight copy, no second model), scores them with the reward functions, and turns each group's
rewards into advantages (reward minus the group mean, divided by the group or batch std). The
loss is PPO's clipped surrogate per completion token plus beta times the k3 estimate of the KL to
the reference policy (the model with its adapters switched off; a frozen copy of the initial model
only where nothing else gives it back: full fine-tuning), reduced as TRL's `loss_type`s:

    grpo     each completion's token mean, then the mean over completions (Shao et al.)
    dr_grpo  the token sum over the batch / (completions * max_new_tokens) (Liu et al., Dr. GRPO)
    dapo     the token sum / the completion tokens of the whole step (Yu et al.; TRL's bnpo
             equals it when a step is one micro-batch, and is accepted as a name for it)

The trainer's contract holds: `loss_and_sums` returns a sum over a micro-batch and `count` the
step's normaliser, so accumulation and micro-batch sizes change nothing. The same generation
batch serves `num_iterations` consecutive steps (the job repeats each prompt batch that often);
from the second on, the probabilities it was sampled with (`old`, computed once, before the
first update) make the importance ratio differ from 1 and the clipping act.

Sampling is seeded per completion from (train seed, step, row), so a resumed run draws what an
uninterrupted one draws; the generation batch being reused is kept in each checkpoint. Under
torchrun (DDP) each rank samples its share of a step's prompts, by the same seeds, and the
ranks gather the whole batch; the trainer then splits it over them as any global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nanotune.errors import NanotuneError
from nanotune.training.dist import gather_objects, rank, world_size
from nanotune.training.losses import IGNORE, Batch, token_logprobs

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


# ---- advantages --------------------------------------------------------------------------------


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std (TRL's nanstd without NaNs); 0 for a single value."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros(()) if dim is None else torch.zeros(x.shape[:dim] + x.shape[dim + 1 :])
    return x.std() if dim is None else x.std(dim=dim)


def group_advantages(
    rewards: Tensor, group_size: int, scale: ScaleRewards = "group"
) -> tuple[Tensor, Tensor]:
    """(advantages, zero-std flags), both [N], of the summed rewards [N] of N // G groups of
    consecutive rows: reward - group mean, divided by (std + 1e-4) of the group ("group"), of
    the whole batch ("batch") or not ("none"), as TRL's GRPOTrainer."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    if scale == "batch":
        std = _std(rewards).expand_as(rewards)
    else:  # "none" still reports groups without variance
        std = _std(grouped, 1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


# ---- the loss ----------------------------------------------------------------------------------


@dataclass
class TokenTerms:
    """Per completion token ([N, T], zero where `mask` is 0): the loss, the KL estimate, and
    whether the ratio was clipped where it counts (below 1-eps with a negative advantage, above
    1+eps_high with a positive one)."""

    loss: Tensor
    kl: Tensor | None
    clipped: Tensor


def token_terms(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float,
) -> TokenTerms:
    """PPO's clipped surrogate with GRPO's per-completion advantage, plus beta * KL (k3:
    exp(ref - logp) - (ref - logp) - 1, Schulman 2020), per token.

    logps: [N, T] the policy's log-probs of the completion tokens (with their graph);
    old_logps: what they were when sampled (None: these very values, so the ratio is 1);
    advantages: [N]; mask: [N, T] 1 on completion tokens that count."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    a = advantages[:, None]
    loss = -torch.min(ratio * a, clipped_ratio * a)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    m = mask.to(loss.dtype)
    return TokenTerms(loss * m, None if kl is None else kl * m, clipped & (mask > 0))


def loss_sum(terms: TokenTerms, mask: Tensor, loss_type: LossType, max_new_tokens: int) -> Tensor:
    """The micro-batch's share of the step loss before the division by `step_count`."""
    if loss_type == "grpo":
        return (terms.loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return terms.loss.sum() / max_new_tokens
    if loss_type in ("dapo", "bnpo"):
        return terms.loss.sum()
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}")


def step_count(loss_type: LossType, completions: int, tokens: int) -> int:
    """What a step's summed loss is divided by: its completions, or its completion tokens."""
    return max(1, tokens if loss_type in ("dapo", "bnpo") else completions)


# ---- completion log-probabilities ---------------------------------------------------------------


def completion_logps(model: nn.Module, batch: Batch, temperature: float = 1.0) -> Tensor:
    """[N, T] log-probability of each completion token (0 elsewhere) under `model`, from the
    logits divided by `temperature` (the distribution it was sampled from, as TRL scores it).
    Hidden states are gathered where a completion token is predicted before the LM head."""
    targets = batch["targets"]
    h = model.hidden(batch["input_ids"])
    keep = targets != IGNORE
    logits = model.lm_head(h[keep])
    if temperature != 1.0:
        logits = logits / temperature
    out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    logps = token_logprobs(logits, targets[keep])
    return out.masked_scatter(keep, logps.to(out.dtype))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---- rewards ------------------------------------------------------------------------------------


RewardFn = Callable[..., Sequence[float]]
"""fn(completions, prompts=..., reference=..., completion_ids=..., **columns) -> a float per
completion (TRL's reward-function signature)."""


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def score(
    rewards: Sequence[Reward],
    completions: list[str],
    prompts: list[str],
    references: list[str],
    completion_ids: list[list[int]],
    rows: list[str],
) -> Tensor:
    """[N, F] rewards of N completions by F functions; a function that raises, returns the wrong
    count or a non-finite value is a NanotuneError naming it and the row (`rows[i]`)."""
    out = torch.zeros(len(completions), len(rewards), dtype=torch.float64)
    for j, reward in enumerate(rewards):
        try:
            values = reward.fn(
                completions,
                prompts=prompts,
                reference=references,
                completion_ids=completion_ids,
            )
        except NanotuneError:
            raise
        except Exception as e:
            row, e = _failing_row(reward, completions, prompts, references, completion_ids, e)
            where = rows[row] if row is not None else f"rows {rows[0]}..{rows[-1]}"
            raise NanotuneError(
                f"reward {reward.name} raised {type(e).__name__}: {e} on {where}; fix the function"
            ) from e
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise NanotuneError(
                f"reward {reward.name} returned {len(values)} values for {len(completions)} "
                "completions; return one float per completion"
            )
        for i, v in enumerate(values):
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                raise NanotuneError(
                    f"reward {reward.name} gave {values[i]!r} for {rows[i]} (completion "
                    f"{completions[i][:60]!r}); a reward must be a finite number"
                )
            out[i, j] = v
    return out


def _failing_row(
    reward: Reward,
    completions: list[str],
    prompts: list[str],
    references: list[str],
    completion_ids: list[list[int]],
    error: Exception,
) -> tuple[int | None, Exception]:
    """The first completion the function raises on when called on it alone (and that error)."""
    for i in range(len(completions)):
        try:
            reward.fn(
                completions[i : i + 1],
                prompts=prompts[i : i + 1],
                reference=references[i : i + 1],
                completion_ids=completion_ids[i : i + 1],
            )
        except Exception as e:
            return i, e
    return None, error


# ---- the objective ------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One training prompt: its token ids, its text and reference answer (for the rewards), and
    where it came from (for error messages)."""

    ids: list[int]
    text: str
    reference: str
    where: str


class GRPOObjective:
    """The trainer's objective for GRPO: `prepare` turns a batch of prompt indices into the
    step's completions (generated, scored, with advantages and old/reference log-probs);
    `loss_and_sums` is the loss of a micro-batch of them.

    engine: a `decoding.engine.Engine` over the policy built with `route_adapters=False`, so it
        decodes the model as it is now, trained adapters included.
    reference: reference(model) is a context manager giving the reference policy: the model
        itself with its adapters off (LoRA), or a frozen copy of the model as it was before
        training (full fine-tuning); needed when beta > 0.
    """

    name = "grpo"

    def __init__(
        self,
        engine: Any,
        prompts: Sequence[Prompt],
        rewards: Sequence[Reward],
        *,
        num_generations: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        mask_truncated_completions: bool = False,
        seed: int = 0,
        pad_id: int = 0,
        stop_token_ids: tuple[int, ...] | None = None,
        reference: Callable[[nn.Module], AbstractContextManager] | None = None,
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        if beta and reference is None:
            raise ValueError("beta > 0 needs a reference context")
        self.engine, self.prompts, self.rewards = engine, list(prompts), list(rewards)
        self.G, self.temperature, self.top_p = num_generations, temperature, top_p
        self.max_new_tokens = max_new_tokens
        self.beta, self.epsilon = beta, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.num_iterations, self.loss_type = num_iterations, loss_type
        self.scale_rewards, self.mask_truncated = scale_rewards, mask_truncated_completions
        self.seed, self.pad_id = seed, pad_id
        self.stop_token_ids = stop_token_ids  # None: the tokenizer's (EOS, end of turn)
        self.reference, self.autocast = reference, autocast
        self._rollout: dict[str, Any] | None = None  # {"step": first step, "batch", "stats"}

    # -- the trainer's contract

    def count(self, batch: Batch) -> int:
        return int(batch["count"][0])

    def loss_and_sums(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        mask = (batch["targets"] != IGNORE).float()
        logps = completion_logps(model, batch, self.temperature)
        T = logps.shape[-1]  # the trainer trims padding columns off input_ids and targets
        old = batch["old_logps"][:, :T] if self.num_iterations > 1 else None
        ref = batch["ref_logps"][:, :T] if self.beta else None
        terms = token_terms(
            logps,
            old,
            ref,
            batch["advantages"],
            mask,
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
        )
        loss = loss_sum(terms, mask, self.loss_type, self.max_new_tokens)
        # Token means over the whole step, whatever `count` counts: each row carries the
        # step's count over its completion tokens.
        per_token = batch["count_per_token"][0]
        sums = {"clip_fraction": terms.clipped.float().sum() * per_token}
        if terms.kl is not None:
            sums["kl"] = terms.kl.detach().sum() * per_token
        return loss, sums

    def loss_sum(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss_and_sums(model, batch)[0]

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        raise NanotuneError("GRPO has no validation loss; held-out prompts are scored by eval")

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    # -- checkpoints: the generation batch in use, so a resumed run reuses the same one

    def state(self) -> dict[str, Any] | None:
        return self._rollout

    def load_state(self, state: dict[str, Any] | None) -> None:
        self._rollout = state

    # -- generation

    def prepare(self, model: nn.Module, batch: Batch, step: int) -> tuple[Batch, dict[str, float]]:
        """The completions step `step` (1-based) trains on, and the rollout's metrics (logged
        with the step that generated them)."""
        first = step - (step - 1) % self.num_iterations
        if self._rollout is None or self._rollout["step"] != first:
            self._rollout = {"step": first, **self.rollout(model, batch["prompt_index"], first)}
            return self._rollout["batch"], self._rollout["stats"]
        return self._rollout["batch"], {}

    def sampling_seed(self, step: int, row: int) -> int:
        return (self.seed * 1_000_003 + step) * 100_003 + row

    def generate(
        self, model: nn.Module, prompt_rows: list[int], step: int, first: int = 0
    ) -> tuple[list[list[int]], list[bool]]:
        """G completions of each prompt (ids, the stop token included) and whether each ran
        out of `max_new_tokens`, through the engine on the live model; the completions are
        rows `first`, `first + 1`, ... of the step (each row's own seed)."""
        from nanotune.decoding.engine import Sampling
        from nanotune.decoding.lora import decode_copies

        sampling = [
            Sampling(
                max_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.sampling_seed(step, first + r),
                stop_token_ids=self.stop_token_ids,
            )
            for r in range(len(prompt_rows) * self.G)
        ]
        prompts = [self.prompts[i].ids for i in prompt_rows for _ in range(self.G)]
        # Sampled in the precision it trains in, through decode copies of the weights made once
        # for the whole batch (they change only after it) and freed with the KV cache on return.
        with _eval_mode(model), self.autocast(), decode_copies(model, self.engine.compiles):
            done = self.engine.run(prompts, sampling)
        ids = [s.output + ([s.stop_token] if s.stop_token is not None else []) for s in done]
        return ids, [s.finish_reason == "length" for s in done]

    @torch.no_grad()
    def rollout(self, model: nn.Module, index: Tensor, step: int) -> dict[str, Any]:
        """The step's generation batch. Under torchrun each rank samples and scores its share
        of the prompts (whole groups, each completion with the seed of its row in the step, so
        the completions are a single process's) and every rank gathers the whole batch: the
        trainer splits a global batch over the ranks, and advantages need every group."""
        rows = [int(i) for i in index]
        W, me = world_size(), rank()
        lo, hi = me * len(rows) // W, (me + 1) * len(rows) // W
        mine = rows[lo:hi]
        ids_mine, truncated_mine = self.generate(model, mine, step, first=lo * self.G)
        prompts_mine = [self.prompts[i] for i in mine for _ in range(self.G)]
        tokenizer = self.engine.tokenizer
        texts = [tokenizer.decode(c, skip_special=True) for c in ids_mine]
        try:
            scored: Tensor | str = score(
                self.rewards,
                texts,
                [p.text for p in prompts_mine],
                [p.reference for p in prompts_mine],
                ids_mine,
                [p.where for p in prompts_mine],
            )
        except NanotuneError as e:  # every rank raises it, none waits for the failed one
            scored = str(e)
        shares = gather_objects((ids_mine, truncated_mine, scored))
        failed = [s for _, _, s in shares if isinstance(s, str)]
        if failed:
            raise NanotuneError(failed[0])
        completion_ids = [c for ids, _, _ in shares for c in ids]
        truncated = [t for _, ts, _ in shares for t in ts]
        per_func = torch.cat([s for _, _, s in shares])
        prompts = [self.prompts[i] for i in rows for _ in range(self.G)]
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        total = (per_func * weights).sum(1)
        advantages, zero_std = group_advantages(total, self.G, self.scale_rewards)
        batch = self._batch(prompts, completion_ids, truncated, advantages.float())
        device = next(model.parameters()).device
        own = {k: v[lo * self.G : hi * self.G].to(device) for k, v in batch.items()}

        def logps(policy: nn.Module) -> Tensor:  # of this rank's rows (a rank may have none)
            if not mine:
                return torch.zeros(0, batch["targets"].shape[1])
            return completion_logps(policy, own, self.temperature).cpu()

        if self.num_iterations > 1:
            with _eval_mode(model), self.autocast():
                batch["old_logps"] = torch.cat(gather_objects(logps(model)))
        if self.beta:
            with _eval_mode(model), self.autocast(), self.reference(model) as reference:
                batch["ref_logps"] = torch.cat(gather_objects(logps(reference)))
        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
        stats = {
            "reward": float(total.mean()),
            "reward_std": float(_std(total)),
            **{
                f"rewards/{r.name}/mean": float(per_func[:, j].mean())
                for j, r in enumerate(self.rewards)
            },
            **{
                f"rewards/{r.name}/std": float(_std(per_func[:, j]))
                for j, r in enumerate(self.rewards)
            },
            "advantage_mean": float(advantages.mean()),
            "advantage_std": float(_std(advantages)),
            "advantage_abs_max": float(advantages.abs().max()),
            "completion_length_mean": float(lengths.mean()),
            "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()),
            "truncated_fraction": sum(truncated) / len(truncated),
            "zero_std_fraction": float(zero_std.view(-1, self.G)[:, 0].float().mean()),
        }
        return {"batch": batch, "stats": stats}

    def _batch(
        self,
        prompts: list[Prompt],
        completions: list[list[int]],
        truncated: list[bool],
        advantages: Tensor,
    ) -> dict[str, Tensor]:
        """Rows prompt + completion, right-padded; `targets` hold each completion token at the
        position that predicts it (IGNORE elsewhere, and on truncated completions when
        `mask_truncated_completions`)."""
        N = len(prompts)
        T = max(len(p.ids) + len(c) for p, c in zip(prompts, completions, strict=True))
        ids = torch.full((N, T), self.pad_id, dtype=torch.long)
        targets = torch.full((N, T), IGNORE, dtype=torch.long)
        for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            seq = p.ids + c
            ids[r, : len(seq)] = torch.tensor(seq)
            if c and not (self.mask_truncated and truncated[r]):
                n = len(p.ids)
                targets[r, n - 1 : n - 1 + len(c)] = torch.tensor(c)
        tokens = int((targets != IGNORE).sum())
        count = step_count(self.loss_type, N, tokens)
        return {
            "input_ids": ids,
            "targets": targets,
            "advantages": advantages,
            "count": torch.full((N,), count),
            "count_per_token": torch.full((N,), count / max(1, tokens)),
        }

"""What a GRPO run (`rl.algorithm: grpo`) wires: the training prompts and their reference
answers, the decoding engine over the live policy, the rewards, the objective, the prompt
batches per step, and the held-out mean reward before and after training."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from nanotune.decoding.engine import Engine, Sampling
from nanotune.decoding.lora import decode_copies
from nanotune.errors import NanotuneError
from nanotune.eval.evaluate import split_prompt
from nanotune.training.grpo import GRPOObjective, Prompt, Reward, score

MAX_ENGINE_BATCH = 256  # completions decoded together at most


def prompts_of(examples: Sequence[Any], tokenizer: Any, split: str) -> list[Prompt]:
    """Each example's prompt (its unsupervised prefix) and reference (its first supervised span,
    as text): a completion or chat row's answer, formatted as for supervised training."""
    out = []
    for i, ex in enumerate(examples):
        where = f"{split} example {i}"
        prompt, answer = split_prompt(ex.ids, ex.labels, where)
        text = tokenizer.decode(prompt)
        reference = tokenizer.decode(answer, skip_special=True).strip()
        out.append(Prompt(prompt, text, reference, f"{where} ({text[-40:]!r})"))
    return out


def rewards(config: Any, functions: Sequence[Callable[..., Any]] = ()) -> list[Reward]:
    """`rl.rewards` and the Python `functions`, with the reward model loaded when one is named."""
    from nanotune.training.rewards import build_rewards

    scorer = None
    if "reward_model" in config.rl.rewards:
        from nanotune.eval import RewardModel
        from nanotune.jobs.prepare import reward_model_folder

        model = RewardModel(reward_model_folder(config.rl.reward_model))

        def reward_model(completions: list[str], prompts: list[str], **_: Any) -> list[float]:
            return model.score(prompts, completions)

        scorer = reward_model
    return build_rewards(config.rl, functions, scorer, parsed_calls)


def parsed_calls(text: str) -> list[tuple[str, Any]]:
    """(name, arguments) of each tool call in a text, in order, read as the eval metric
    `tool_call` reads them (`data.tools.parse_tool_calls`: Hermes/Qwen `<tool_call>` blocks)."""
    import json

    from nanotune.data.tools import parse_tool_calls

    _, calls = parse_tool_calls(text)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def check(config: Any, model: nn.Module) -> None:
    """What a GRPO run refuses before its run directory exists."""
    from nanotune.training.dist import resolve_strategy, world_size

    rl, tc = config.rl, config.train
    W = world_size()
    if tc.batch_size * W % rl.num_generations:
        ranks = f" x {W} processes" if W > 1 else ""
        raise NanotuneError(
            f"rl.num_generations: {rl.num_generations} must divide the completions per step "
            f"(train.micro_batch_size x train.grad_accum{ranks} = {tc.batch_size * W}); a step "
            f"trains {tc.batch_size * W} // {rl.num_generations} prompts"
        )
    if W > 1 and resolve_strategy(tc.strategy) != "ddp":
        raise NanotuneError(
            f"train.strategy: {tc.strategy} shards the weights, and GRPO's ranks each decode "
            "with the whole model; use train.strategy: ddp (or auto) under torchrun"
        )


def objective(
    config: Any, model: nn.Module, tokenizer: Any, prompts: list[Prompt], rewards: list[Reward]
) -> GRPOObjective:
    from nanotune.training import autocast_for
    from nanotune.training.dist import device_for

    rl, tc = config.rl, config.train
    engine = Engine(
        model,
        tokenizer,
        max_batch=min(MAX_ENGINE_BATCH, tc.batch_size),
        max_queue=MAX_ENGINE_BATCH,
        # Weights change between steps, so no cached keys/values may outlive one.
        prefix_cache_mb=0,
        route_adapters=False,
        compile=rl.compile,
    )
    return GRPOObjective(
        engine,
        prompts,
        rewards,
        num_generations=rl.num_generations,
        temperature=rl.temperature,
        top_p=rl.top_p,
        max_new_tokens=rl.max_new_tokens,
        beta=rl.beta,
        epsilon=rl.epsilon,
        epsilon_high=rl.epsilon_high,
        num_iterations=rl.num_iterations,
        loss_type=rl.loss_type,
        scale_rewards=rl.scale_rewards,
        mask_truncated_completions=rl.mask_truncated_completions,
        seed=tc.seed,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
        reference=reference_policy(model) if rl.beta else None,
        autocast=autocast_for(tc, device_for(tc.device)),
    )


def reference_policy(model: nn.Module) -> Callable[[nn.Module], AbstractContextManager]:
    """What GRPO's KL is measured against: the model with its adapters off where that gives
    back the model before training (LoRA), else a frozen copy of the model made now, before the
    first step (full fine-tuning, trained embeddings): the only case that holds a second copy.
    A resumed run builds it from the same initial weights, before the checkpoint loads."""
    from nanotune.jobs.reference import reference_context

    adapters_off = reference_context(model)
    if adapters_off is not None:
        return adapters_off
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def frozen_copy(_: nn.Module) -> Iterator[nn.Module]:
        yield frozen

    return frozen_copy


def prompt_batches(config: Any, n_prompts: int) -> Callable[[int], list[dict]]:
    """epoch -> its steps' batches of prompt indices (shuffled by the seed and the epoch), each
    repeated num_iterations times: those steps train on one generation batch. A step's prompts
    are the global batch's (under torchrun each rank samples its share of them)."""
    from nanotune.training.dist import world_size

    rl, tc = config.rl, config.train
    per_step = tc.batch_size * world_size() // rl.num_generations

    def batches(epoch: int) -> list[dict]:
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(tc.seed + epoch))
        out = []
        for lo in range(0, n_prompts - per_step + 1, per_step):
            out += [{"prompt_index": order[lo : lo + per_step]}] * rl.num_iterations
        return out

    return batches


@torch.no_grad()
def heldout_reward(
    model: nn.Module, tokenizer: Any, prompts: list[Prompt], rewards: list[Reward], max_new: int
) -> dict[str, float]:
    """Mean weighted reward (and each reward's mean) of greedy completions of held-out prompts."""
    if not prompts:
        return {}
    was_training = model.training
    engine = Engine(
        model,
        tokenizer,
        max_batch=min(MAX_ENGINE_BATCH, len(prompts)),
        max_queue=MAX_ENGINE_BATCH,
        prefix_cache_mb=0,
        route_adapters=False,
    )
    with decode_copies(model, engine.compiles):
        done = engine.run(
            [p.ids for p in prompts],
            [Sampling(max_tokens=max_new, temperature=0.0)] * len(prompts),
        )
    model.train(was_training)
    ids = [s.output for s in done]
    texts = [tokenizer.decode(i, skip_special=True) for i in ids]
    per_func = score(
        rewards,
        texts,
        [p.text for p in prompts],
        [p.reference for p in prompts],
        ids,
        [p.where for p in prompts],
    )
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
    out = {"rl_reward": float((per_func * weights).sum(1).mean())}
    if len(rewards) > 1:
        out |= {f"rl_reward_{r.name}": float(per_func[:, j].mean()) for j, r in enumerate(rewards)}
    return out

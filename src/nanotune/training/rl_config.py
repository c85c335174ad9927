"""RLConfig: the `rl:` section, online reinforcement learning from reward functions (GRPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanotune.errors import NanotuneError

BUILTIN_REWARDS = (
    "exact_match",
    "numeric_match",
    "contains",
    "format",
    "length",
    "tool_call",
    "reward_model",
)


@dataclass
class RLConfig:
    """Online RL with verifiable rewards (training/grpo.py): each step samples num_generations
    completions per prompt of the training data (completion or chat rows; their answer is the
    reference the rewards compare with) and pushes the policy toward the better ones."""

    algorithm: Literal["grpo"] | None = None
    """grpo trains the policy on its own samples scored by `rewards`; null = no RL (the data's
    own task)."""
    num_generations: int = 4
    """Completions sampled per prompt (the group size G)."""
    temperature: float = 1.0
    """Sampling temperature of the completions (the log-probs are scored at it too)."""
    top_p: float = 1.0
    """Nucleus sampling of the completions."""
    max_new_tokens: int = 32
    """Most tokens per completion; one that reaches it is truncated."""
    compile: bool = False
    """Sample the completions through compiled decode steps (a graph per batch bucket,
    compiled in the first steps: tens of seconds on a CPU). On the CPU bench's GRPO case it
    measured even with eager (0.97x, bf16); it pays where decoding is most of a step (long
    completions, float32, a GPU)."""
    beta: float = 0.0
    """Weight of the KL to the reference (the model with its LoRA adapters off; under full
    fine-tuning a frozen copy of the initial model, held only then); 0 skips the reference
    pass."""
    epsilon: float = 0.2
    """Clip range below 1 of the importance ratio."""
    epsilon_high: float | None = None
    """Clip range above 1 (DAPO's clip-higher); null = epsilon."""
    num_iterations: int = 1
    """Optimizer steps per generation batch (from the second on, the importance ratio of the
    updated policy to the sampling one is clipped)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """How token losses are averaged, as TRL names them: grpo (per completion, then over
    completions), dr_grpo (sum / (completions x max_new_tokens)), dapo (over the step's
    completion tokens; bnpo is the same here)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the std of the group's rewards, of the batch's, or not at all."""
    mask_truncated_completions: bool = False
    """Completions cut by max_new_tokens take no part in the loss."""
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    """Reward functions: built-ins (exact_match, numeric_match, contains, format, length,
    tool_call: the completion's parsed tool calls against the reference's, 1 when equal, partial
    credit for the right function with some arguments right; reward_model) or
    path/to/file.py:function (fn(completions, prompts=, reference=,
    completion_ids=) -> floats; loaded once); Python callables come through
    nanotune.train(config, rewards=[fn])."""
    reward_weights: list[float] | None = None
    """One weight per reward (null: 1 each); the reward is their weighted sum."""
    format_pattern: str = r"\s*\S.*"
    """Regular expression the whole completion must match for the `format` reward."""
    reward_model: str | None = None
    """The `reward_model` reward's scorer: a sequence-classification model (folder, hub id or a
    nanotune reward run, as eval.reward_model) scoring (prompt, completion)."""

    def __post_init__(self) -> None:
        if self.algorithm not in (None, "grpo"):
            raise NanotuneError(f"rl.algorithm: {self.algorithm!r} is not grpo (or null)")
        checks = [
            ("num_generations", self.num_generations >= 2, "at least 2 (a group needs two)"),
            ("temperature", self.temperature > 0, "> 0 (GRPO samples)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("beta", self.beta >= 0, ">= 0"),
            ("epsilon", 0 <= self.epsilon < 1, "in [0, 1)"),
            ("epsilon_high", self.epsilon_high is None or self.epsilon_high >= 0, ">= 0"),
            ("num_iterations", self.num_iterations >= 1, "at least 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise NanotuneError(f"rl.{name}: must be {what}, got {getattr(self, name)}")
        if self.loss_type not in ("grpo", "dr_grpo", "dapo", "bnpo"):
            raise NanotuneError(
                f"rl.loss_type: {self.loss_type!r} is not one of grpo, dr_grpo, dapo, bnpo"
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise NanotuneError(
                f"rl.scale_rewards: {self.scale_rewards!r} is not one of group, batch, none"
            )
        for name in self.rewards:
            if name not in BUILTIN_REWARDS and ".py:" not in name:
                raise NanotuneError(
                    f"rl.rewards: {name!r} is neither a built-in reward "
                    f"({', '.join(BUILTIN_REWARDS)}) nor path/to/file.py:function"
                )
        if "reward_model" in self.rewards and not self.reward_model:
            raise NanotuneError(
                "rl.rewards: reward_model needs rl.reward_model (a reward model folder, e.g. "
                "runs/demo-reward)"
            )
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise NanotuneError(
                f"rl.reward_weights: {len(self.reward_weights)} weights for "
                f"{len(self.rewards)} rewards; give one per reward (or none)"
            )

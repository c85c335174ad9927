"""Reward functions for GRPO: the built-ins named in `rl.rewards`, and user functions from
`path/to/file.py:function` (loaded once, by the config, never by the data).

Each takes TRL's reward signature: fn(completions, prompts=..., reference=...,
completion_ids=...) -> one float per completion.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nanotune.errors import NanotuneError
from nanotune.training.grpo import Reward
from nanotune.training.rl_config import BUILTIN_REWARDS, RLConfig

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def exact_match(completions: list[str], reference: list[str], **_: Any) -> list[float]:
    """1 when the completion equals the reference (case, outer spaces, a final dot aside)."""
    return [
        float(_normalize(c) == _normalize(r)) for c, r in zip(completions, reference, strict=True)
    ]


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numeric_match(completions: list[str], reference: list[str], **_: Any) -> list[float]:
    """1 when the completion's last number (its final answer: "3 + 4 = 7") equals the
    reference's (1e-6 apart at most)."""
    out = []
    for c, r in zip(completions, reference, strict=True):
        want, got = _last_number(r), _last_number(c)
        out.append(float(want is not None and got is not None and abs(want - got) <= 1e-6))
    return out


def contains(completions: list[str], reference: list[str], **_: Any) -> list[float]:
    """1 when the reference appears in the completion (case aside)."""
    return [
        float(_normalize(r) in _normalize(c)) for c, r in zip(completions, reference, strict=True)
    ]


def format_reward(pattern: str) -> Callable[..., list[float]]:
    """1 when the whole completion matches `pattern` (re.fullmatch, DOTALL)."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise NanotuneError(
            f"rl.format_pattern: {pattern!r} is not a regular expression ({e})"
        ) from e

    def format(completions: list[str], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(c) is not None) for c in completions]

    return format


def length_penalty(max_new_tokens: int) -> Callable[..., list[float]]:
    """-(completion tokens / max_new_tokens): 0 for an empty completion, -1 for a full one."""

    def length(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [-len(ids) / max_new_tokens for ids in completion_ids]

    return length


Call = tuple[str, Any]
"""A parsed tool call: (function name, arguments as JSON values)."""


def _call_credit(got: Call, want: Call) -> float:
    """0 for another function; else 0.5 for the name plus 0.5 x the share of argument keys (of
    both calls' together) whose values are equal: 1 exactly when name and arguments equal."""
    (name, args), (want_name, want_args) = got, want
    if name != want_name:
        return 0.0
    if not isinstance(args, dict) or not isinstance(want_args, dict):
        return float(args == want_args)
    keys = set(args) | set(want_args)
    if not keys:
        return 1.0
    same = sum(k in args and k in want_args and args[k] == want_args[k] for k in keys)
    return 0.5 + 0.5 * same / len(keys)


def tool_call_reward(parse: Callable[[str], list[Call]]) -> Callable[..., list[float]]:
    """The `tool_call` reward over `parse` (text -> its tool calls, in order; the job passes
    `data.tools.parse_tool_calls`' reading, as the eval metric `tool_call` uses).

    1 when the completion's calls equal the reference's (names and arguments as JSON values, in
    order: the eval metric's match). A reference without calls: 1 when the completion makes
    none either, else 0 (its text is left to other rewards). Otherwise partial credit, so a
    group that gets the function right but not all its arguments still ranks above one that
    calls nothing: each reference call is paired with the completion's call at its position and
    earns 0.5 for the function's name plus 0.5 x the share of argument keys with equal values,
    and the sum is divided by the larger count of calls (extra or missing calls earn 0). A
    completion whose call does not parse has no call."""

    def tool_call(completions: list[str], reference: list[str], **_: Any) -> list[float]:
        out = []
        for c, r in zip(completions, reference, strict=True):
            got, want = parse(c), parse(r)
            if not want:
                out.append(float(not got))
            elif got == want:
                out.append(1.0)
            else:
                credit = sum(_call_credit(g, w) for g, w in zip(got, want, strict=False))
                out.append(credit / max(len(got), len(want)))
        return out

    return tool_call


def load_function(spec: str) -> Callable[..., Sequence[float]]:
    """The function `name` of `path/to/file.py:name`, the file run once as its own module."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise NanotuneError(f"rl.rewards: {spec}: no file {path}; give path/to/file.py:function")
    module_name = f"nanotune_reward_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader = importlib.util.spec_from_file_location(module_name, path)
        if loader is None or loader.loader is None:
            raise NanotuneError(f"rl.rewards: {spec}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise NanotuneError(
                f"rl.rewards: {spec}: importing {path} raised {type(e).__name__}: {e}"
            ) from e
        sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise NanotuneError(f"rl.rewards: {spec}: {path} has no function {name!r}")
    return fn


def build_rewards(
    cfg: RLConfig,
    extra: Sequence[Callable[..., Any]] = (),
    reward_model: Callable[..., Sequence[float]] | None = None,
    parse_calls: Callable[[str], list[Call]] | None = None,
) -> list[Reward]:
    """The rewards of `rl.rewards` (weighted by `rl.reward_weights`), then the Python callables
    given to `nanotune.train(..., rewards=[...])` (weight 1 each). `reward_model` scores the
    `reward_model` reward and `parse_calls` reads the tool calls of the `tool_call` one (the job
    gives both: `jobs/grpo.py`; training/ knows no model loading and no data formats)."""
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    out = []
    for spec, weight in zip(cfg.rewards, weights, strict=True):
        if spec == "format":
            fn = format_reward(cfg.format_pattern)
        elif spec == "length":
            fn = length_penalty(cfg.max_new_tokens)
        elif spec == "reward_model":
            if reward_model is None:
                raise ValueError("the reward_model reward needs its scorer")
            fn = reward_model
        elif spec == "tool_call":
            if parse_calls is None:
                raise ValueError("the tool_call reward needs its parser")
            fn = tool_call_reward(parse_calls)
        elif spec in BUILTIN_REWARDS:
            fn = {"exact_match": exact_match, "numeric_match": numeric_match, "contains": contains}[
                spec
            ]
        else:
            fn = load_function(spec)
        out.append(Reward(spec, fn, float(weight)))
    for fn in extra:
        if not callable(fn):
            raise NanotuneError(f"rewards=[...]: {fn!r} is not a function")
        out.append(Reward(getattr(fn, "__name__", repr(fn)), fn, 1.0))
    if not out:
        raise NanotuneError("GRPO needs at least one reward: set rl.rewards or pass rewards=[fn]")
    return out

"""GRPO's built-in rewards that need more than a line: `tool_call` (the completion's parsed tool
calls against the reference's, as the eval metric `tool_call` reads and matches them)."""

from __future__ import annotations

import json

import pytest

from nanotune.errors import NanotuneError


def call(name: str, **args) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def tool_call_reward():
    from nanotune.jobs.grpo import rewards
    from nanotune.training.rl_config import RLConfig

    cfg = type("Config", (), {"rl": RLConfig(algorithm="grpo", rewards=["tool_call"])})()
    (reward,) = rewards(cfg)
    assert reward.name == "tool_call"
    return reward.fn


def test_tool_call_reward_is_one_exactly_where_the_eval_metric_matches():
    from nanotune.eval.metrics import tool_call_scores

    fn = tool_call_reward()
    want = call("get_weather", city="Paris", unit="celsius")
    completions = [
        want,  # the same call
        "Let me check. " + call("get_weather", unit="celsius", city="Paris"),  # key order, text
        call("get_weather", city="Paris", unit="fahrenheit"),  # one argument wrong
        call("get_weather", city="Paris"),  # one argument missing
        call("get_time", city="Paris", unit="celsius"),  # another function
        "It is sunny in Paris.",  # no call
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # unparsable
        want + call("get_time", city="Paris"),  # an extra call
    ]
    got = fn(completions, reference=[want] * len(completions))
    assert got == [1.0, 1.0, 0.5 + 0.5 * 1 / 2, 0.5 + 0.5 * 1 / 2, 0.0, 0.0, 0.0, 0.5]
    # Full reward exactly where the eval metric counts a match.
    for c, r in zip(completions, got, strict=True):
        assert (r == 1.0) == (tool_call_scores([c], [want])["tool_call"] == 1.0)


def test_tool_call_reward_without_a_reference_call_and_with_two_calls():
    fn = tool_call_reward()
    # The reference answers in text: a completion that calls nothing earns 1, one that calls 0.
    assert fn(["Paris is in France.", call("search", q="Paris")], reference=["France."] * 2) == [
        1.0,
        0.0,
    ]
    two = call("a", x=1) + call("b", y=[1, 2])
    got = fn(
        [two, call("a", x=1), call("b", y=[1, 2]) + call("a", x=1), call("a", x=1.0) + call("b")],
        reference=[two] * 4,
    )
    # in order; a missing call earns nothing; JSON numbers compare as values (1 == 1.0)
    assert got == [1.0, 0.5, 0.0, (1.0 + 0.5) / 2]


def test_tool_call_reward_needs_its_parser_and_is_a_known_name():
    from nanotune.training.rewards import build_rewards
    from nanotune.training.rl_config import RLConfig

    with pytest.raises(ValueError, match="needs its parser"):
        build_rewards(RLConfig(rewards=["tool_call"]))
    with pytest.raises(NanotuneError, match="tool_call"):
        RLConfig(rewards=["tool_calls"])  # the error lists the built-ins, tool_call among them

"""Data that ships with nanotune or is generated in code, selectable as ``source: builtin:<name>``.

- ``chatterbot``: ~2,000 question -> answer pairs from the chatterbot-corpus package (BSD), read
  from the installed package, never copied into this repository.
- ``reverse_words``: "Reverse the words: a b c" -> "c b a". Exact-match scoring is objective and a
  135M model learns it in minutes of LoRA on a CPU.
- ``arithmetic``: "What is 7 + 5?" -> "12", every sum and difference of 0..12 once (260 rows),
  for GRPO with a numeric-match reward.
- ``word_order``: classify a word list as "sorted" (alphabetical) or "shuffled".
- ``reverse_words_pairs``: preference pairs over the same lists: the reversal chosen, and
  rejected the same reversal with two neighbouring words swapped (subtly wrong, same length).
- ``tool_calls``: a request ("What is 17 times 23?", "Weather in Oslo in fahrenheit?") answered
  by one call of a small calculator/weather/time tool set (`TOOLS`, in each row's `tools`):
  the right name and arguments, scored by the `tool_call` metric (format: chat, with a template
  that renders tools, e.g. data.chat_template: chatml-tools).

Every row carries the fields several formats read (prompt/completion, user/assistant,
instruction/input/output, text/label), so any matching format works without a column mapping.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from nanotune.data.example import Row
from nanotune.errors import NanotuneError

# Short, common, single-token-ish words: the task is about order, not vocabulary.
WORDS = (
    "apple river stone cloud green table music light water paper house bread glass horse night "
    "chair dream field smile ocean plant tiger sugar metal storm train honey ghost lemon eagle "
    "piano robot candle forest garden island jacket kitten ladder mirror orange pencil rabbit "
    "silver tomato violin window yellow zebra bottle button castle coffee dragon flower guitar"
).split()
REVERSE_INSTRUCTION = "Reverse the order of the words."
N_SYNTHETIC = 2000


def chatterbot() -> Iterator[Row]:
    """Question -> answer pairs; longer conversations become multi-turn `messages`."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise NanotuneError(
            "builtin:chatterbot needs the chatterbot-corpus package; "
            "pip install --no-deps chatterbot-corpus==1.3.3"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            conversations = (yaml.safe_load(f) or {}).get("conversations") or []
        for n, conv in enumerate(conversations):
            turns = [str(t).strip() for t in conv if t is not None]
            if len(turns) < 2:
                continue
            # A conversation alternates speakers; the last turn is always the bot's.
            turns = turns[len(turns) % 2 :]
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": t}
                for i, t in enumerate(turns)
            ]
            yield Row(
                {
                    "messages": messages,
                    "prompt": turns[0],
                    "completion": turns[1],
                    "question": turns[0],
                    "answer": turns[1],
                    "topic": path.stem,
                },
                f"chatterbot:{path.name}: conversation {n}",
            )


def reverse_words(n: int = N_SYNTHETIC, seed: int = 0) -> Iterator[Row]:
    """`n` word lists (3 to 5 words) and their reversal; the same rows for the same seed."""
    rng = random.Random(seed)
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        text, answer = " ".join(words), " ".join(reversed(words))
        yield Row(
            {
                "prompt": f"Reverse the words: {text}",
                "completion": answer,
                "user": f"Reverse the words: {text}",
                "assistant": answer,
                "instruction": REVERSE_INSTRUCTION,
                "input": text,
                "output": answer,
            },
            f"builtin:reverse_words: row {i}",
        )


def reverse_words_pairs(n: int = N_SYNTHETIC, seed: int = 0) -> Iterator[Row]:
    """`reverse_words` as preference pairs: chosen is the reversal, rejected the reversal with
    one neighbouring pair of words swapped; both have the same words and length."""
    rng = random.Random(seed + 1)
    for i, row in enumerate(reverse_words(n, seed)):
        words = row["completion"].split()
        j = rng.randrange(len(words) - 1)
        wrong = words[:j] + [words[j + 1], words[j]] + words[j + 2 :]
        yield Row(
            {"prompt": row["prompt"], "chosen": row["completion"], "rejected": " ".join(wrong)},
            f"builtin:reverse_words_pairs: row {i}",
        )


def word_order(n: int = N_SYNTHETIC, seed: int = 0) -> Iterator[Row]:
    """Word lists labelled "sorted" (alphabetical) or "shuffled" (not alphabetical), half each."""
    rng = random.Random(seed)
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 6))
        if i % 2 == 0:
            words.sort()
        elif words == sorted(words):
            words.reverse()
        label = "sorted" if words == sorted(words) else "shuffled"
        yield Row({"text": " ".join(words), "label": label}, f"builtin:word_order: row {i}")


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_NUMBER = {"type": "number"}
_CITY = {"type": "string"}
TOOLS = [
    _function("add", "a + b", {"a": _NUMBER, "b": _NUMBER}, ["a", "b"]),
    _function("multiply", "a * b", {"a": _NUMBER, "b": _NUMBER}, ["a", "b"]),
    _function(
        "get_weather",
        "Current weather in a city",
        {"city": _CITY, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    _function("get_time", "Local time in a city", {"city": _CITY}, ["city"]),
]
CITIES = (
    "Paris Oslo Tokyo Lima Cairo Berlin Madrid Toronto Sydney Nairobi Dublin Seoul Quito Rome "
    "Vienna Lisbon Athens Prague Warsaw Helsinki Manila Delhi Bogota Havana Denver Boston"
).split()
# (tool, question templates); {a} {b} numbers, {city} a city
_ASKS = {
    "add": [
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "Compute {a} + {b}.",
        "Sum of {a} and {b}?",
    ],
    "multiply": ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}."],
    "get_weather": [
        "What's the weather in {city}?",
        "Is it raining in {city} right now?",
        "How warm is it in {city}?",
    ],
    "get_weather_f": [
        "What's the weather in {city} in fahrenheit?",
        "Temperature in {city}, in fahrenheit please.",
    ],
    "get_time": ["What time is it in {city}?", "Local time in {city}?"],
}


def tool_calls(n: int = N_SYNTHETIC, seed: int = 0) -> Iterator[Row]:
    """`n` requests, each answered by one call of `TOOLS` (right name, right arguments); the
    same rows for the same seed."""
    rng = random.Random(seed)
    kinds = list(_ASKS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        a, b, city = rng.randint(2, 999), rng.randint(2, 999), rng.choice(CITIES)
        question = rng.choice(_ASKS[kind]).format(a=a, b=b, city=city)
        if kind in ("add", "multiply"):
            name, args = kind, {"a": a, "b": b}
        elif kind == "get_weather_f":
            name, args = "get_weather", {"city": city, "unit": "fahrenheit"}
        else:
            name, args = kind, {"city": city}
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        yield Row(
            {
                "tools": TOOLS,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                ],
            },
            f"builtin:tool_calls: row {i}",
        )


def arithmetic(largest: int = 12, seed: int = 0) -> Iterator[Row]:
    """Every sum and every non-negative difference of two numbers 0..`largest` ("What is 7 + 5?"
    -> "12"), each once, in a seeded order: a held-out split holds problems never trained on.
    SmolLM2-135M-Instruct answers some of them (it often explains instead), so a reward for the
    right number has signal from the start (the GRPO recipe)."""
    problems = [(a, "+", b) for a in range(largest + 1) for b in range(largest + 1)]
    problems += [(a, "-", b) for a in range(largest + 1) for b in range(a + 1)]
    random.Random(seed).shuffle(problems)
    for i, (a, op, b) in enumerate(problems):
        question, answer = f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)
        yield Row(
            {
                "prompt": question,
                "completion": answer,
                "user": question,
                "assistant": answer,
                "instruction": question,
                "input": "",
                "output": answer,
            },
            f"builtin:arithmetic: row {i}",
        )


BUILTINS: dict[str, Callable[[], Iterator[Row]]] = {
    "arithmetic": arithmetic,
    "chatterbot": chatterbot,
    "reverse_words": reverse_words,
    "reverse_words_pairs": reverse_words_pairs,
    "tool_calls": tool_calls,
    "word_order": word_order,
}

"""What each side hands the timer: a step function and the per-step inputs it was built for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MARK = "RESULT "  # prefix of the one stdout line a worker reports on
LR = 1e-4  # AdamW learning rate, the same on both sides (other settings: torch defaults)
BETA = 0.1  # DPO's beta on both sides (TRL's default and nanotune's)


class NotApplicable(Exception):
    """A side cannot run this case here; the message says why and lands in the table."""


@dataclass
class Workload:
    """`step(inputs[i])` is step i; inputs are prepared before timing starts."""

    step: Callable[[Any], None]
    inputs: list[Any]

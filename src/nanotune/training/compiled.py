"""`train.compile`: the training forward and backward of the model's blocks through torch.compile.

What is compiled is each transformer block (the model's `compile_blocks`): blocks of one shape
share one graph, so compile time does not grow with depth, and lengths and batch sizes are
traced as symbols, so a run with varied lengths compiles once (measured against bucketed static
lengths in benchmarks/NOTES.md). The LM head and the fused losses stay eager: they are a few
large products already fused by hand. Evaluation and decoding stay eager too.

`auto` runs the first steps eager, times them, and compiles only where the rest of the run,
eager, would last longer than the break-even of this device kind (`BREAK_EVEN_S`): the compile
seconds divided by the share of a step that compiling saves.
"""

from __future__ import annotations

import torch
from torch import nn

from nanotune.errors import NanotuneError
from nanotune.training.dist import all_reduce_sum, world_size

BREAK_EVEN_S = {"cpu": 600.0, "cuda": 120.0}
"""Seconds of eager training left past which `auto` compiles, per device kind.

CPU (Xeon with AMX, 2 cores shared with other work at load 7-14, torch 2.13; NOTES.md
2026-12-07), 4-layer 256-wide models through the Trainer: float32 compiled 1.7-3.9x faster for
23-109 s of compile (break-even 55-146 s of eager steps); bf16 full fine-tuning 2.9x for 87 s
(131 s), bf16 LoRA slower compiled (never: auto keeps it eager, see `CompiledBlocks`). 600 s
keeps short runs eager and leaves room for a loaded machine's slower compile. CUDA: not
measured (no GPU in reach); torch.compile's usual 30-60 s compile and 1.3-2x step put it near
120 s; `python -m nanotune.bench.gpu_check` prints the figures to set it from."""

AUTO_AFTER = 2
"""Eager steps `auto` times before it decides (the first one pays one-off allocation costs)."""


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that can run their blocks compiled (a classifier's body, ...)."""
    return [m for m in model.modules() if hasattr(m, "compile_blocks")]


class CompiledBlocks:
    """Switches a model's blocks between eager and compiled per `train.compile` and says what it
    did and what it cost in the run log."""

    def __init__(
        self, model: nn.Module, mode: bool | str, device: torch.device, precision: str = "float32"
    ) -> None:
        self.targets = compile_targets(model)
        # CPU bf16 with frozen weights (LoRA, last_n): measured slower compiled (NOTES.md) -
        # eager linear layers cast a frozen weight to bf16 once, a compiled graph every call.
        self.cpu_bf16_frozen = (
            device.type == "cpu"
            and precision == "bfloat16"
            and any(not p.requires_grad for p in model.parameters())
        )
        self.mode = mode
        self.device = device
        if mode is True and not self.targets:
            raise NanotuneError(
                "train.compile: this model has no blocks to compile; set train.compile: false"
            )
        self.on = False
        # Only auto decides during the run (true decides in `start`).
        self.decided = mode is False or (mode == "auto" and not self.targets)
        self._first_s: float | None = None
        self.compile_s: float | None = None
        """Seconds the first compiled step took beyond the second one: the compile."""
        self._frames_at_start = 0

    def start(self, info) -> None:
        """Before the first step: compile now for `true`; `auto` waits for timed eager steps."""
        if self.mode is True:
            self._enable(info, "train.compile true")
        elif self.mode is False:
            return
        elif not self.targets:
            info("train.compile auto: eager (this model has no blocks to compile)")
        elif self.device.type not in BREAK_EVEN_S:
            self.decided = True
            info(f"train.compile auto: eager (no measured break-even on {self.device.type})")
        elif self.cpu_bf16_frozen:
            self.decided = True
            info(
                "train.compile auto: eager (bf16 on a CPU with frozen weights: compiled steps "
                "measured slower, the graph casts each frozen weight at every call)"
            )

    def after_step(self, steps_here: int, step_s: float, steps_left: int, info) -> dict:
        """After each step of this process (`steps_here` of them, the last `step_s` seconds):
        `auto` decides after AUTO_AFTER eager steps; metrics to log (compile_s once known)."""
        if not self.decided and steps_here >= AUTO_AFTER:
            self.decided = True
            # Every rank decides alike, on the mean of their timings.
            step_s = float(all_reduce_sum(torch.tensor([step_s], dtype=torch.float64))[0])
            step_s /= world_size()
            eager_left = step_s * steps_left
            break_even = BREAK_EVEN_S[self.device.type]
            why = (
                f"~{eager_left:,.0f} s of eager steps left ({step_s:.2f} s a step x {steps_left}), "
                f"break-even on {self.device.type} {break_even:,.0f} s"
            )
            if eager_left >= break_even:
                self._enable(info, f"train.compile auto: compiled ({why})")
            else:
                info(f"train.compile auto: eager ({why})")
            return {}
        if not self.on or self.compile_s is not None:
            return {}
        if self._first_s is None:
            self._first_s = step_s
            return {}
        self.compile_s = max(0.0, self._first_s - step_s)
        info(
            f"compiled blocks: {self.compile_s:.1f} s to compile (the first compiled step, "
            f"{self._first_s:.1f} s, less the next one, {step_s:.2f} s)"
        )
        return {"compile_s": self.compile_s}

    def graphs(self) -> int:
        """Frames torch.compile compiled since the blocks were switched on: one per kind of block
        (a family with local and global layers has two), never one per length."""
        from torch._dynamo.utils import counters

        return counters["frames"]["total"] - self._frames_at_start if self.on else 0

    def close(self, info) -> None:
        """After the run: back to eager (what the caller handed in), with the recompile count."""
        if not self.on:
            return
        if self._first_s is not None and self.compile_s is None:  # one compiled step only
            info(f"compiled blocks: the only compiled step took {self._first_s:.1f} s")
        info(f"compiled blocks: {self.graphs()} graph(s) compiled in the run")
        for m in self.targets:
            m.compile_blocks(False)
        self.on = False

    def _enable(self, info, why: str) -> None:
        from torch._dynamo.utils import counters

        self._frames_at_start = counters["frames"]["total"]
        for m in self.targets:
            m.compile_blocks(True)
        self.on = self.decided = True
        info(f"{why}: the blocks run through torch.compile (inductor), lengths as symbols")

"""`nanotune demo`: the packaged `demo` recipe end to end, with a before/after summary.

Fine-tunes the embedded SmolLM2-135M-Instruct with LoRA on generated data (offline), evaluates
the base and the fine-tuned model on the same held-out examples, prints the table and a few
generations, and writes report.html into the run directory.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from nanotune.jobs.config import DemoCommand
from nanotune.jobs.finetune import RunResult, train
from nanotune.recipes import load_recipe

DEMO_RECIPE = "demo"
_MARKER = re.compile(r"<\|[^|<>]*\|>")
_ROLE_WORDS = {"system", "user", "assistant"}


def default_output_dir() -> Path:
    """A fresh run directory per call, so `nanotune demo` can be run again without flags."""
    return Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"


def last_user_text(prompt: str) -> str:
    """The last line of a rendered chat prompt that is content, not template scaffolding."""
    lines = [_MARKER.sub("", line).strip() for line in prompt.splitlines()]
    content = [line for line in lines if line and line not in _ROLE_WORDS]
    return content[-1] if content else prompt.strip()


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_samples(samples: list[dict[str, str]]) -> str:
    """Sample generations as aligned text blocks: input, reference, before, after."""
    blocks = []
    for s in samples:
        blocks.append(
            "\n".join(
                [
                    f"  input      {_short(last_user_text(s['prompt']))}",
                    f"  reference  {_short(s['reference'])}",
                    f"  before     {_short(s['before'])}",
                    f"  after      {_short(s.get('after', ''))}",
                ]
            )
        )
    return "\n\n".join(blocks)


def run_demo(
    output_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    overrides: list[str] = (),
    progress: bool = True,
) -> RunResult:
    """Run the demo recipe into `output_dir` (default: a new `runs/demo-<time>` folder).

    `overrides` are recipe values such as "model=./my-llama" or "train.max_steps=10"; an existing
    `output_dir` is refused unless `overwrite`.
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    config = load_recipe(DEMO_RECIPE, [*overrides, f"output_dir={out}"])
    start = time.perf_counter()
    result = train(config, overwrite=overwrite, progress=progress)
    if result.samples:
        print(f"\nsample generations ({config.eval.split} split):\n")
        print(format_samples(result.samples))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {result.report}")
    return result


def demo_command(c: DemoCommand) -> int:
    run_demo(c.output_dir, overwrite=c.overwrite, overrides=c.overrides)
    return 0

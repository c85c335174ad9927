"""Run logging on rank 0 only: metrics.jsonl, a tqdm bar, and the trackers of `train.report_to`
(TensorBoard, Weights & Biases, MLflow, Trackio), each imported only when named."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write
from nanotune.training.dist import is_main

Scalars = dict[str, float]
Tracker = tuple[Callable[[Scalars, int], None], Callable[[], None]]  # (log, close)


def _tracker(name: str, run_dir: Path, start_step: int) -> Tracker:
    """Open one tracker for this run: its log(scalars, step) and close()."""
    project, run = "nanotune", run_dir.name
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

        def log(scalars: Scalars, step: int) -> None:
            for k, v in scalars.items():
                tb.add_scalar(k.replace("eval_", "eval/"), v, step)

        return log, tb.close
    if name == "wandb":
        import wandb

        w = wandb.init(project=project, name=run, dir=str(run_dir))
        return (lambda scalars, step: w.log(scalars, step=step)), w.finish
    if name == "mlflow":
        import mlflow

        mlflow.start_run(run_name=run)
        return (lambda scalars, step: mlflow.log_metrics(scalars, step=step)), mlflow.end_run
    if name == "trackio":
        import trackio

        trackio.init(project=project, name=run)
        return (lambda scalars, step: trackio.log(scalars, step=step)), trackio.finish
    raise ValueError(f"unknown tracker {name!r}")  # TrainConfig refuses it first


class RunLogger:
    """The one place that writes run output; every method is a no-op off rank 0."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        progress: bool,
        report_to: Sequence[str] = (),
    ) -> None:
        self.main = is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.trackers: list[Tracker] = []
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
        )
        self.trackers = [_tracker(name, Path(run_dir), start_step) for name in report_to]

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines, and a
        last line cut short when the run was killed while writing it."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        kept = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) and not text.endswith("\n"):
                    break  # every record is written whole with its newline: this one was cut
                raise NanotuneError(
                    f"{self.path}:{n}: not valid JSON ({e.msg}); fix or remove the line, then "
                    "resume again"
                ) from e
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write(self.path, "".join(ln + "\n" for ln in kept))

    def info(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        }
        for log, _ in self.trackers:
            log(scalars, record["step"])

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for _, close in self.trackers:
            close()

"""Run logging on rank 0 only: metrics.jsonl, a tqdm bar, and the trackers of `train.report_to`
(TensorBoard, Weights & Biases, MLflow, Trackio), each imported only when named.

Each tracker run gets the run's config as hyperparameters, and the run id each tracker gave is
kept in the run directory (`trackers.json`) so that a resumed run continues the same tracker
run instead of opening a new one (TensorBoard continues by its `purge_step`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write
from nanotune.training.dist import is_main

Scalars = dict[str, float]
Tracker = tuple[Callable[[Scalars, int], None], Callable[[], None]]  # (log, close)
TRACKER_IDS = "trackers.json"  # tracker name -> the id of its run for this run directory


def _tracker(
    name: str,
    run_dir: Path,
    start_step: int,
    project: str | None,
    hparams: dict[str, Any] | None,
    run_id: str | None,
) -> tuple[Tracker, str | None]:
    """Open one tracker for this run: its log(scalars, step) and close(), and the id of its
    run; `run_id` (saved when this run started) continues that run."""
    run = run_dir.name
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

        def log(scalars: Scalars, step: int) -> None:
            for k, v in scalars.items():
                tb.add_scalar(k.replace("eval_", "eval/"), v, step)

        return (log, tb.close), None
    if name == "wandb":
        import wandb

        # wandb.init's arguments override the environment: name the project it would read.
        w = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or "nanotune",
            name=run,
            dir=str(run_dir),
            config=hparams,
            id=run_id,
            resume="allow",
        )
        return ((lambda scalars, step: w.log(scalars, step=step)), w.finish), w.id
    if name == "mlflow":
        import mlflow

        # Like wandb's project: the environment's experiment, else "nanotune" (not "Default").
        mlflow.set_experiment(project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "nanotune")
        if run_id:
            active = mlflow.start_run(run_id=run_id)  # its params were logged when it began
        else:
            active = mlflow.start_run(run_name=run)
            mlflow.log_params(_flat(hparams or {}))
        return (
            (lambda scalars, step: mlflow.log_metrics(scalars, step=step)),
            mlflow.end_run,
        ), active.info.run_id
    if name == "trackio":
        import trackio

        name = run_id or run  # Trackio knows a run by its name within the project
        trackio.init(
            project=project or "nanotune",
            name=name,
            config=hparams,
            resume="allow" if run_id else "never",
        )
        return ((lambda scalars, step: trackio.log(scalars, step=step)), trackio.finish), name
    raise ValueError(f"unknown tracker {name!r}")  # TrainConfig refuses it first


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as MLflow params: `{"train": {"lr": 1}}` -> `{"train.lr": 1}`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunLogger:
    """The one place that writes run output; every method is a no-op off rank 0."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        progress: bool,
        report_to: Sequence[str] = (),
        *,
        project: str | None = None,
        hparams: dict[str, Any] | None = None,
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
        self._open_trackers(Path(run_dir), start_step, report_to, project, hparams)

    def _open_trackers(
        self,
        run_dir: Path,
        start_step: int,
        report_to: Sequence[str],
        project: str | None,
        hparams: dict[str, Any] | None,
    ) -> None:
        """Open each tracker, continuing the runs a resumed run (start_step > 0) began."""
        path = run_dir / TRACKER_IDS
        saved = json.loads(path.read_text()) if start_step > 0 and path.is_file() else {}
        ids = {}
        for name in report_to:
            tracker, ids[name] = _tracker(
                name, run_dir, start_step, project, hparams, saved.get(name)
            )
            self.trackers.append(tracker)
        ids = {name: run_id for name, run_id in ids.items() if run_id is not None}
        if ids:
            atomic_write(path, json.dumps(ids, indent=1) + "\n")

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

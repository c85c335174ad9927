"""Runs that go wrong: signals, a non-finite loss, damaged checkpoints, a full disk, a metrics
line cut short. Each must stop with one clear line and leave a state `--resume` continues from."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import (
    LMObjective,
    ScriptedEval,
    TrainConfig,
    Trainer,
    params,
    tiny,
    uneven_batch,
)

from nanotune.errors import NanotuneError
from nanotune.eval.report import read_metrics
from nanotune.training import Interrupted
from nanotune.training.checkpoint import load_checkpoint, save_checkpoint, step_dirs
from nanotune.training.logger import RunLogger

pytestmark = pytest.mark.usefixtures("one_thread")


# --- SIGINT / SIGTERM ------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from safetensors.torch import save_file
    sys.path.insert(0, os.path.dirname(__file__))
    from test_training import LMObjective, TrainConfig, Trainer, tiny, uneven_batch
    from nanotune.training import Interrupted
    from nanotune.training.checkpoint import trainable_state

    class Slow(LMObjective):  # gives the parent process time to signal us mid-run
        def loss_sum(self, model, batch):
            time.sleep(float(os.environ.get("SLOW", "0")))
            return super().loss_sum(model, batch)

    def batches(epoch):
        order = torch.randperm(4, generator=torch.Generator().manual_seed(100 + epoch))
        return [uneven_batch(int(i)) for i in order]

    run_dir = sys.argv[1]
    cfg = TrainConfig(lr=5e-3, max_steps=12, micro_batch_size=4, grad_accum=2, warmup_steps=2,
                      eval_every=4, seed=3)
    trainer = Trainer(tiny(dropout=0.1), cfg, batches, run_dir, val_batches=[uneven_batch(9)],
                      objective=Slow(), progress=False)
    try:
        trainer.fit(resume="--resume" in sys.argv)
    except Interrupted as e:  # as the CLI's main() does
        print(f"nanotune: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    save_file(trainable_state(trainer.model), os.path.join(run_dir, "final.safetensors"))
    """
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def script():
    path = Path(__file__).parent / "_train_interrupt_script.py"
    path.write_text(SCRIPT)
    yield [sys.executable, str(path)]
    path.unlink()


@pytest.fixture(scope="module")
def uninterrupted(script, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run([*script, str(run)], env=ENV, check=True, capture_output=True)
    return run


def _start_and_wait_first_step(script: list[str], run: Path, slow: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*script, str(run)],
        env={**ENV, "SLOW": slow},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, deadline = run / "metrics.jsonl", time.time() + 60
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    return proc


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_resume_equals_uninterrupted(
    sig, script, uninterrupted, tmp_path
):
    run = tmp_path / "run"
    proc = _start_and_wait_first_step(script, run, slow="0.05")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"{name}: stopping after this step" in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        rf"nanotune: stopped by {name} after step (\d+) of 12; saved checkpoint (\S+); "
        r"continue with: nanotune train CONFIG --resume",
        last,
    )
    assert m, err
    step = int(m[1])
    assert 1 <= step < 12 and Path(m[2]) == run / "checkpoints" / f"step-{step}"
    assert load_checkpoint(Path(m[2]))[1]["step"] == step
    assert not (run / "final.safetensors").exists()

    subprocess.run([*script, str(run), "--resume"], env=ENV, check=True, capture_output=True)
    got = load_file(run / "final.safetensors")
    want = load_file(uninterrupted / "final.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert _steps(run) == _steps(uninterrupted)


def test_second_sigint_stops_at_once_leaving_checkpoints_intact(script, tmp_path):
    run = tmp_path / "run"
    proc = _start_and_wait_first_step(script, run, slow="0.3")
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the second must come after the first was handled
        if "SIGINT: stopping after this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "nanotune: stopped at once by a second SIGINT; the checkpoints written before are "
        "intact; continue with: nanotune train CONFIG --resume"
    )
    for d in step_dirs(run / "checkpoints"):
        load_checkpoint(d)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_fit_off_the_main_thread_restores_the_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    failed = []

    def run() -> None:  # Python refuses signal handlers here: training goes on without them
        try:
            trainer(tmp_path / "thread", max_steps=1).fit()
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not failed and (tmp_path / "thread" / "checkpoints" / "step-1").is_dir()
    with pytest.raises(NanotuneError, match="training loss is nan"):
        trainer(tmp_path / "main", objective=NanFrom(1)).fit()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_cli_exit_code_and_one_line_for_an_interrupted_run(monkeypatch, capsys):
    from nanotune.cli import main

    def stopped(*args, **kwargs):
        raise Interrupted(signal.SIGTERM, "stopped by SIGTERM after step 3 of 9; saved ...")

    monkeypatch.setattr("nanotune.jobs.finetune.train", stopped)
    assert main(["train", "run.yaml"]) == 143
    assert capsys.readouterr().err == "nanotune: stopped by SIGTERM after step 3 of 9; saved ...\n"


# --- resume needs a checkpoint; a damaged one is refused by name -------------------------------


def batches_for(epoch: int) -> list[dict]:
    return [uneven_batch(s) for s in range(4)]


def trainer(run: Path, model=None, objective=None, val=(), **overrides) -> Trainer:
    cfg = dict(lr=1e-2, max_steps=6, micro_batch_size=4, grad_accum=2, save_every=2, keep_last=3)
    cfg.update(overrides)
    model = model or tiny()
    return Trainer(
        model,
        TrainConfig(**cfg),
        batches_for,
        run,
        val_batches=val,
        objective=objective,
        progress=False,
    )


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(NanotuneError, match=r"no checkpoint to resume from .*--overwrite"):
        trainer(tmp_path).fit(resume=True)


def _flip_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys):
    ref = trainer(tmp_path / "ref")
    ref.fit()
    want = params(ref.model)
    ckpts = tmp_path / "ref" / "checkpoints"
    assert [d.name for d in step_dirs(ckpts)] == ["step-2", "step-4", "step-6"]

    _flip_byte(ckpts / "step-6" / "trainable.safetensors")
    with pytest.raises(NanotuneError) as e:
        load_checkpoint(ckpts / "step-6")
    assert str(e.value) == (
        f"checkpoint {ckpts / 'step-6'} is damaged (trainable.safetensors: sha256 differs from "
        f"the one written); resume from an earlier one: move this folder out of {ckpts} and run "
        "again with --resume"
    )
    state = ckpts / "step-4" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(NanotuneError, match=r"step-4 is damaged \(state.pt: sha256 differs"):
        load_checkpoint(ckpts / "step-4")

    capsys.readouterr()
    resumed = trainer(tmp_path / "ref", model=tiny(seed=5))
    resumed.fit(resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts / 'step-6'} is damaged" in out
    assert f"resuming from {ckpts / 'step-2'} instead" in out
    got = params(resumed.model)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_every_checkpoint_damaged_and_unhashed_truncation(tmp_path):
    run = tmp_path / "run"
    trainer(run, max_steps=2).fit()
    step2 = run / "checkpoints" / "step-2"
    # Written before checksums existed: a cut-short file is still refused by name.
    (step2 / "checksums.json").unlink()
    weights = step2 / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(NanotuneError, match=r"step-2 is damaged \(trainable.safetensors: "):
        load_checkpoint(step2)
    with pytest.raises(NanotuneError, match=r"no intact checkpoint to resume from .*step-2"):
        trainer(run, max_steps=2).fit(resume=True)


def test_damaged_best_keeps_the_last_weights(tmp_path, capsys):
    run = tmp_path / "run"
    val = [uneven_batch(9)]
    trainer(run, max_steps=4, eval_every=2, objective=ScriptedEval([1.0, 2.0]), val=val).fit()
    _flip_byte(run / "checkpoints" / "best" / "trainable.safetensors")
    capsys.readouterr()
    # The run is complete: resuming only restores the best weights, which are damaged now.
    again = trainer(run, max_steps=4, eval_every=2, objective=ScriptedEval([]), val=val)
    again.fit(resume=True)
    assert (
        f"{run / 'checkpoints' / 'best'} is damaged (trainable.safetensors: sha256 differs from "
        "the one written): keeping the last weights, not the best"
    ) in capsys.readouterr().out
    last, _ = load_checkpoint(run / "checkpoints" / "step-4")
    assert all(torch.equal(p, last[n]) for n, p in params(again.model).items())


# --- a non-finite loss ---------------------------------------------------------------------------


class NanFrom(LMObjective):
    """Loss becomes NaN from the `n`-th micro-batch on (two per step here)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def loss_sum(self, model, batch):
        self.calls += 1
        loss = super().loss_sum(model, batch)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    model = tiny()
    t = Trainer(
        model,
        TrainConfig(lr=1e-2, max_steps=6, micro_batch_size=4, grad_accum=2, save_every=2),
        batches_for,
        run,
        objective=NanFrom(6),  # the second micro-batch of step 3
        progress=False,
    )
    with pytest.raises(NanotuneError) as e:
        t.fit()
    assert str(e.value) == (
        "step 3: training loss is nan, so the run stopped before applying it (the last good "
        f"checkpoint is {run / 'checkpoints' / 'step-2'}); lower train.lr (now 0.01) or check "
        "the data for broken examples, then run again (--resume continues from the last "
        "checkpoint)"
    )
    assert [d.name for d in step_dirs(run / "checkpoints")] == ["step-2"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    # The weights are those of step 2, as the checkpoint holds them.
    saved, _ = load_checkpoint(run / "checkpoints" / "step-2")
    assert all(torch.equal(p, saved[n]) for n, p in params(model).items())


def test_huge_lr_diverges_into_one_clear_error(tmp_path):
    with pytest.raises(
        NanotuneError, match=r"^step \d+: training (loss|gradient norm) is (nan|inf)"
    ):
        trainer(tmp_path, lr=1e30, max_steps=20, schedule="constant").fit()


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("big", ["weights", "state"])
def test_full_disk_while_checkpointing(small_disk, big):
    small = {"w": torch.ones(8)}
    save_checkpoint(small_disk / "step-1", small, {"step": 1})
    large = {"w": torch.ones(1 << 19)}  # 2 MiB
    weights, state = (large, {"step": 2}) if big == "weights" else (small, {"step": 2, **large})
    with pytest.raises(NanotuneError) as e:
        save_checkpoint(small_disk / "step-2", weights, state)
    assert str(e.value) == (
        f"no space left on {small_disk} while writing checkpoint {small_disk / 'step-2'}; the "
        "previous checkpoint is intact; free some space (or lower train.keep_last) and continue "
        "with --resume"
    )
    assert sorted(p.name for p in small_disk.iterdir()) == ["step-1"]  # no temporary folder
    assert torch.equal(load_checkpoint(small_disk / "step-1")[0]["w"], small["w"])


def test_unwritable_checkpoint_folder(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(NanotuneError, match=r"cannot write checkpoint .*step-1 \(File exists: "):
        save_checkpoint(tmp_path / "checkpoints" / "step-1", {"w": torch.ones(2)}, {})


# --- metrics.jsonl cut short -------------------------------------------------------------------


def test_metrics_line_cut_short_is_dropped_on_resume_and_tolerated_by_readers(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    metrics.write_text(whole + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]
    RunLogger(tmp_path, total_steps=9, start_step=2, progress=False).close()
    assert metrics.read_text() == "".join(whole.splitlines(keepends=True)[:2])
    # A broken line that is not a cut-short last one is the user's to fix: named, not dropped.
    metrics.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(NanotuneError, match=r"metrics.jsonl:2: not valid JSON"):
        RunLogger(tmp_path, total_steps=9, start_step=2, progress=False)


# --- SIGKILL ---------------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume_is_bit_identical(script, uninterrupted, tmp_path):
    """Killed with no warning (SIGKILL) at random moments, checkpoint writes included, a run
    resumed each time from what is on disk ends with exactly the uninterrupted weights."""
    import random

    run = tmp_path / "run"
    rng = random.Random(7)
    kills = resumes = 0

    def last_step() -> int:  # a line being written (or cut by the kill) is not read
        lines = (run / "metrics.jsonl").read_text().splitlines() if run.exists() else []
        return max([0, *(json.loads(x)["step"] for x in lines if x.endswith("}"))])

    for _ in range(4):
        resume = bool(step_dirs(run / "checkpoints"))
        resumes += resume
        done = last_step() if (run / "metrics.jsonl").exists() else 0
        proc = subprocess.Popen(
            [*script, str(run), *(["--resume"] if resume else [])],
            env={**ENV, "SLOW": "0.05"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Past start-up (a step beyond what was on disk), then a random moment of training.
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            if (run / "metrics.jsonl").exists() and last_step() > done:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        kills += 1
        for ckpt in step_dirs(run / "checkpoints"):
            load_checkpoint(ckpt)  # every checkpoint on disk is whole (checksums verified)
    if not (run / "final.safetensors").exists():
        resume = bool(step_dirs(run / "checkpoints"))
        subprocess.run([*script, str(run), *(["--resume"] if resume else [])], env=ENV, check=True)
    assert kills >= 1 and resumes >= 1  # it was killed, and resumed from a checkpoint
    want = load_file(str(uninterrupted / "final.safetensors"))
    got = load_file(str(run / "final.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert _steps(run) == _steps(uninterrupted)  # the metrics, too, as if never killed

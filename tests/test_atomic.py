"""files/atomic.py: files and folders appear whole or not at all, even under SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanotune.errors import NanotuneError
from nanotune.files.atomic import MARKER, atomic_dir, atomic_write, check_target, read_marker


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "eval.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_atomic_dir_marks_what_it_wrote_and_cleans_up_a_failed_write(tmp_path):
    out = tmp_path / "out"
    atomic_dir(out, lambda d: (d / "a.txt").write_text("1"), kind="model")
    assert read_marker(out)["kind"] == "model" and set(read_marker(out)["owns"]) >= {"a.txt"}

    def fails(d: Path) -> None:
        (d / "a.txt").write_text("2")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_dir(out, fails, kind="model")
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(NanotuneError, match="not empty"):
        atomic_dir(out, lambda d: None, kind="model", overwrite=False)
    atomic_dir(out, lambda d: (d / "b.txt").write_text("3"), kind="model")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]


def test_check_target_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NanotuneError, match="not a folder"):
        check_target(tmp_path / "file", overwrite=True)
    assert check_target(tmp_path / "new", overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert check_target(tmp_path / "empty", overwrite=False) is False
    with pytest.raises(NanotuneError, match="current folder"):
        check_target(tmp_path, overwrite=True)
    atomic_dir(tmp_path / "ours", lambda d: (d / "data.jsonl").write_text("{}"), kind="model")
    with pytest.raises(NanotuneError, match="the input"):
        check_target(tmp_path / "ours", overwrite=True, inputs=[tmp_path / "ours" / "data.jsonl"])
    assert check_target(tmp_path / "ours", overwrite=True) is True


# --- SIGKILL at random moments -------------------------------------------------------------------

# The child writes the same artifact over and over with alternating weights (seed 0, 1, 0, …) and
# prints "ready" after the first write; the parent kills it at a random moment after that.
_CHILD = r"""
import sys, torch
from pathlib import Path
from nanotune.models.config import ModelConfig
from nanotune.models.transformer import Transformer
from nanotune.tokenizer import gpt2_tokenizer
from nanotune.training.checkpoint import save_checkpoint
from nanotune.weights import save_model
from nanotune.files.atomic import atomic_dir
from nanotune.weights.peft import save_adapter
from nanotune.methods import apply_method
from nanotune.methods.config import MethodConfig

kind, out = sys.argv[1], Path(sys.argv[2])
tok = gpt2_tokenizer()
config = ModelConfig(family="gpt2", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                     block_size=32)
models = []
for seed in (0, 1):
    torch.manual_seed(seed)
    m = Transformer(config)
    if kind == "adapter":
        m = apply_method(m, MethodConfig(name="lora", r=2))
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p)
    models.append(m)
i = 0
while True:
    m = models[i % 2]
    if kind == "model":
        save_model(m, tok, out, overwrite=True)
    elif kind == "adapter":
        atomic_dir(out, lambda d: (save_adapter(m, d, "gpt2"), tok.save(d)), kind="adapter")
    else:
        save_checkpoint(out, {"w": m.wte.weight.detach()}, {"step": i % 2})
    if i == 0:
        print("ready", flush=True)
    i += 1
"""


def _kill_at_random(kind: str, out: Path, delay: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, kind, str(out)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


def _expected(kind: str):
    from nanotune.models.config import ModelConfig
    from nanotune.models.transformer import Transformer
    from nanotune.tokenizer import gpt2_tokenizer

    config = ModelConfig(
        family="gpt2",
        vocab_size=gpt2_tokenizer().vocab_size,
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=32,
    )
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(Transformer(config).wte.weight.detach())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "adapter", "checkpoint"])
def test_sigkill_while_writing_leaves_a_whole_artifact(kind, tmp_path):
    """Killed at random moments while rewriting an export, a final/ adapter or a checkpoint, the
    folder always loads whole, and the next write removes what the killed one left."""
    from nanotune.training.checkpoint import load_checkpoint
    from nanotune.weights import load_model
    from nanotune.weights.peft import read_adapter_config

    wte = _expected(kind)
    out = tmp_path / "artifact"
    rng = random.Random(kind)
    for _ in range(3):
        _kill_at_random(kind, out, rng.uniform(0.0, 0.6))
        assert read_marker(out) is not None
        if kind == "model":
            model, _ = load_model(str(out))
            w = model.wte.weight.detach()
            assert torch.equal(w, wte[0]) or torch.equal(w, wte[1])
        elif kind == "adapter":
            assert read_adapter_config(out)["r"] == 2
            from safetensors.torch import load_file

            assert len(load_file(str(out / "adapter_model.safetensors"))) > 0
        else:
            weights, state = load_checkpoint(out)
            assert torch.equal(weights["w"], wte[state["step"]])
    atomic_dir(out, lambda d: (d / "x").write_text("x"), kind=kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_swap_is_repaired_before_any_check(tmp_path):
    """An old run that a killed --overwrite had moved aside comes back before the target is
    judged, so a plain run cannot slip into it; a sibling's leftovers are not taken."""
    pid = _dead_pid()
    old = tmp_path / f".old-{pid}-run"
    old.mkdir()
    (old / "config.yaml").write_text("mine")
    other = tmp_path / f".old-{pid}-run-2"
    other.mkdir()
    stale = tmp_path / f".tmp-{pid}-run-abcd1234"
    stale.mkdir()
    with pytest.raises(NanotuneError, match="already exists"):
        check_target(tmp_path / "run", overwrite=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == "mine"
    assert other.is_dir() and not stale.exists() and not (tmp_path / "run-2").exists()


def test_a_failed_run_in_an_empty_folder_leaves_it_empty(tmp_path):
    from nanotune.files.atomic import RunDir

    (tmp_path / "out").mkdir()
    run = RunDir(tmp_path / "out", ["config.yaml", "metrics.jsonl"])
    path = run.open(overwrite=False)
    (path / "config.yaml").write_text("x")
    run.close(keep_new=False)
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []

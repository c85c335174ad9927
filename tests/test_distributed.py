"""torch.distributed on CPU (gloo) under the real launcher: torchrun runs this file as its worker.

Launches start together in a module fixture (each costs seconds of torch imports), and every
launch has a wall-clock limit, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nanotune.errors import NanotuneError
from nanotune.methods import apply_method
from nanotune.methods.config import MethodConfig
from nanotune.models import ModelConfig, Transformer
from nanotune.training import TrainConfig, Trainer, dist, seed_everything
from nanotune.training import checkpoint as ckpt

V = 64
STEPS = 3
LIMIT_S = 150  # a launch that takes longer has hung
# name: (method, strategy, n_embd); qlora needs n_embd 256 for its NF4 parts to split in two.
SCENARIOS = {
    "ddp-full": ("full", "ddp", 32),
    "ddp-lora": ("lora", "ddp", 32),
    "ddp-qlora": ("qlora", "ddp", 32),
    "fsdp-full": ("full", "fsdp", 32),
    "fsdp-lora": ("lora", "fsdp", 32),
    "fsdp-qlora": ("qlora", "fsdp", 256),
}


def tiny(method: str, n_embd: int) -> Transformer:
    seed_everything(0)
    model = Transformer(
        ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=n_embd)
    )
    if method != "full":
        model = apply_method(model, MethodConfig(name=method, r=4, targets="all-linear"))
    return model


def global_batches(epoch: int) -> list[dict]:
    """Three right-padded LM batches of 8 rows; label counts differ a lot between rows."""
    g = torch.Generator().manual_seed(epoch)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(4, 20, (8,), generator=g).tolist()
        ids = torch.zeros(8, 20, dtype=torch.long)
        targets = torch.full((8, 20), -100)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.randint(1, V, (n,), generator=g)
            p = int(torch.randint(0, n - 2, (1,), generator=g))
            targets[r, p : n - 1] = ids[r, p + 1 : n]
        out.append({"input_ids": ids, "targets": targets})
    return out


def train_scenario(name: str, micro_batch_size: int, out: Path) -> dict[str, torch.Tensor]:
    method, strategy, n_embd = SCENARIOS[name]
    # A modest lr: Adam turns float rounding in near-zero gradients (e.g. of the key bias,
    # which softmax ignores) into steps of ~lr, so the gap between summation orders scales
    # with it.
    cfg = TrainConfig(
        lr=1e-3,
        micro_batch_size=micro_batch_size,
        grad_accum=2,
        max_steps=STEPS,
        strategy=strategy,
        device="cpu",
    )
    trainer = Trainer(tiny(method, n_embd), cfg, global_batches, out / name, progress=False)
    trainer.fit()
    return ckpt.trainable_state(trainer.model)


def preference_batches(epoch: int) -> list[dict]:
    """Three global batches of 8 preference pairs of uneven prompt and response lengths."""
    from nanotune.data import PreferenceExample
    from nanotune.data.batching import collate_preference

    g = torch.Generator().manual_seed(100 + epoch)

    def ids(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(1, V, (n,), generator=g).tolist()

    return [
        collate_preference(
            [PreferenceExample(ids(2, 8), ids(1, 6), ids(1, 6)) for _ in range(8)], pad_id=0
        )
        for _ in range(STEPS)
    ]


def train_dpo(micro_batch_size: int, out: Path) -> dict[str, torch.Tensor]:
    """LoRA DPO under DDP, the reference being the model with its adapters off (as finetune)."""
    from nanotune.methods import adapters_disabled
    from nanotune.training.preference import PreferenceObjective

    cfg = TrainConfig(
        lr=1e-3, micro_batch_size=micro_batch_size, grad_accum=2, max_steps=STEPS, device="cpu"
    )
    objective = PreferenceObjective("dpo", beta=0.5, reference=adapters_disabled)
    trainer = Trainer(
        tiny("lora", 32), cfg, preference_batches, out / "dpo", objective=objective, progress=False
    )
    trainer.fit()
    return ckpt.trainable_state(trainer.model)


# --- the worker torchrun starts ----------------------------------------------------------------


def _worker(argv: list[str]) -> int:
    """`MODE OUT train ...`: inject MODE's fault (or run the parity scenarios), then the CLI."""
    from nanotune.cli import main
    from nanotune.training.trainer import Trainer as T

    torch.set_num_threads(1)
    mode, out, cli_args = argv[0], Path(argv[1]), argv[2:]
    if mode == "parity":  # every scenario at 2 ranks x micro-batch 2, then a plain CLI run
        with dist.session("cpu", 60):
            for name in SCENARIOS:
                weights = train_scenario(name, 2, out)
                if dist.is_main():
                    save_file(weights, out / f"{name}.safetensors")
            weights = train_dpo(2, out)
            if dist.is_main():
                save_file(weights, out / "ddp-dpo.safetensors")
            try:
                Trainer(
                    tiny("qlora", 32),
                    TrainConfig(strategy="fsdp", device="cpu"),
                    global_batches,
                    out / "nf4",
                )
            except NanotuneError as e:
                (out / f"nf4-error-{dist.rank()}.txt").write_text(str(e))
            return main(cli_args)
    if mode == "kill":  # rank 1 dies by SIGKILL in step 3, after the checkpoint of step 2
        step = T._train_step

        def dying_step(self, *args):
            self.calls = getattr(self, "calls", 0) + 1
            if dist.rank() == 1 and self.calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args)

        T._train_step = dying_step
    if mode == "raise":  # rank 1 meets a corrupt token id in step 2: an exception in forward
        micro = T._micro_batches

        def corrupt(self, batch):
            self.calls = getattr(self, "calls", 0) + 1
            mbs = micro(self, batch)
            if dist.rank() == 1 and self.calls == 2:
                mbs[0]["input_ids"][0, 0] = 10**9
            return mbs

        T._micro_batches = corrupt
    return main(cli_args)


# --- the tests ----------------------------------------------------------------------------------


def _torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, limit_s: float = LIMIT_S) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the distributed job hung (killed after {limit_s}s):\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_gpt2_dir) -> Path:
    root = tmp_path_factory.mktemp("dist")
    words = ["cat", "dog", "sun", "sea", "red", "sky", "one", "two"]
    rows = [
        {"prompt": f"say {words[i % 8]} {i} ->", "completion": " " + " ".join(words[: 1 + i % 6])}
        for i in range(48)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"name": str(tiny_gpt2_dir)},
        "method": {"name": "lora", "r": 2, "targets": ["c_attn", "c_fc"]},
        "data": {"source": str(root / "data.jsonl"), "max_length": 32, "val_fraction": 0.25},
        "train": {
            "lr": 1e-2,
            "max_steps": 6,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "save_every": 2,
            "device": "cpu",
            "dist_timeout": 60,
            # FSDP2 end to end: sharded evaluation, gathered checkpoints and final adapter.
            "strategy": "fsdp",
            "eval_every": 2,
        },
        "output_dir": str(root / "run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    return root / "recipe.yaml"


@pytest.fixture(scope="module")
def launches(recipe, tmp_path_factory):
    """Start the independent launches at once; each test waits for its own."""
    me = str(Path(__file__).resolve())
    runs = {}
    for mode in ("parity", "kill", "raise", "baddata"):
        out = tmp_path_factory.mktemp(mode)
        train = ["train", str(recipe), f"output_dir={out / 'run'}"]
        if mode == "baddata":  # a malformed line: rank 0 finds it while tokenizing, alone
            rows = (recipe.parent / "data.jsonl").read_text().splitlines()
            rows.insert(30, "{not json")
            (out / "bad.jsonl").write_text("\n".join(rows) + "\n")
            train.append(f"data.source={out / 'bad.jsonl'}")
        runs[mode] = (out, _torchrun(me, mode, str(out), *train))
    yield runs
    for _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(launches, tmp_path):
    """DDP and FSDP2, full, LoRA and QLoRA, and LoRA DPO under DDP: 2 x micro-batch 2 ==
    1 x micro-batch 4 after K steps."""
    out, proc = launches["parity"]
    code, log = _finish(proc)
    assert code == 0, log[-3000:]
    # The CLI run's data: tokenized once, the other rank mapped the cache entry.
    assert "data: tokenized on rank 0; 1 of 1 other rank(s) mapped it" in log, log[-3000:]
    torch.set_num_threads(1)
    for name in SCENARIOS:
        got = load_file(out / f"{name}.safetensors")
        want = train_scenario(name, 4, tmp_path)
        assert set(got) == set(want), name
        start = ckpt.trainable_state(tiny(*SCENARIOS[name][::2]))
        for k in want:
            moved = (want[k] - start[k]).abs().max()
            assert moved > 1e-4, f"{name}: {k} barely trained ({moved})"
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=f"{name} {k}")
    # LoRA DPO: pairs split over ranks whole, the adapters-off reference on each rank.
    got, want = load_file(out / "ddp-dpo.safetensors"), train_dpo(4, tmp_path)
    start = ckpt.trainable_state(tiny("lora", 32))
    assert set(got) == set(want)
    for k in want:
        assert (want[k] - start[k]).abs().max() > 1e-4, f"dpo: {k} barely trained"
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=f"dpo {k}")
    # NF4 parts that cannot split over 2 ranks: one clear error on every rank, no hang.
    for r in (0, 1):
        err = (out / f"nf4-error-{r}.txt").read_text()
        assert "does not split evenly over 2 processes" in err and "strategy: ddp" in err


def test_rank_killed_stops_the_job_and_resume_equals_uninterrupted(launches, recipe):
    out, proc = launches["kill"]
    code, log = _finish(proc)
    assert code != 0
    assert "SIGKILL" in log and "rank      : 1" in log, log[-3000:]
    run = out / "run"
    assert not (run / "final").exists()
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None
    code, log = _finish(
        _torchrun("-m", "nanotune", "train", str(recipe), f"output_dir={run}", "--resume")
    )
    assert code == 0, log[-3000:]
    assert "resumed from step" in log
    parity_out, parity = launches["parity"]
    assert _finish(parity)[0] == 0
    got = load_file(run / "final" / "adapter_model.safetensors")
    want = load_file(parity_out / "run" / "final" / "adapter_model.safetensors")
    assert set(got) == set(want) and len(got) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 7))


def test_exception_on_one_rank_fails_every_rank_without_hanging(launches):
    _, proc = launches["raise"]
    code, log = _finish(proc)
    assert code != 0
    assert "IndexError" in log and "rank      : 1" in log, log[-3000:]


def test_bad_data_found_by_rank_0_stops_every_rank_with_its_message(launches):
    """Rank 0 tokenizes while the others wait: its data error reaches them (no hang)."""
    out, proc = launches["baddata"]
    code, log = _finish(proc)
    assert code != 0
    where = f"{out / 'bad.jsonl'}:31: malformed JSON"
    assert f"rank 0: {where}" in log and f"rank 1: {where}" in log, log[-3000:]
    assert not (out / "run").exists()


def test_resume_with_another_world_size_is_refused(launches, recipe, capsys):
    from nanotune.cli import main

    out, proc = launches["kill"]
    _finish(proc)
    run = out / "run"
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None
    assert main(["train", str(recipe), f"output_dir={run}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "made by 2 process(es) but this run has 1" in err, err


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))

"""GRPO under torchrun (DDP, gloo on CPU): each rank samples its share of a step's prompts, the
ranks gather the generation batch, gradients are all-reduced; the run equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import _finish
from test_grpo import grpo_config

LIMIT_S = 300  # a launch that takes longer has hung

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(5) for b in range(5)]


def config(folder, out, micro_batch_size: int) -> dict:
    cfg = grpo_config(
        folder,
        out,
        num_generations=2,
        max_new_tokens=5,  # beta 0.05 and 2 iterations: reference and old log-probs gathered
        # The tiny random model never answers right: parity varies within a group.
        rewards=["numeric_match", f"{out.parent / 'parity.py'}:first_token_parity"],
        reward_weights=[1.0, 0.5],
    )
    cfg["train"] |= {"max_steps": 3, "micro_batch_size": micro_batch_size, "device": "cpu"}
    cfg["train"] |= {"strategy": "auto", "dist_timeout": 120}
    del cfg["train"]["save_every"]
    cfg["eval"] |= {"max_new_tokens": 4, "max_examples": 2}
    return cfg


def test_two_ranks_sample_their_share_and_equal_one_process(tiny_llama_dir, tmp_path):
    """2 ranks x micro-batch 2 (each samples one of a step's 2 prompts x G 2, twice per step
    with accumulation) == 1 process x micro-batch 4: the same completions and rewards every
    step, and the same adapter after 3 steps."""
    import nanotune

    (tmp_path / "parity.py").write_text(
        "def first_token_parity(completions, completion_ids, **kw):\n"
        "    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]\n"
    )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    two = config(tiny_llama_dir, tmp_path / "two", 2)
    two["data"]["source"] = str(data)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "nanotune", "train", str(tmp_path / "recipe.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    one = config(tiny_llama_dir, tmp_path / "one", 4)
    nanotune.train(one, data={"train": ROWS}, progress=False)
    code, log = _finish(proc, LIMIT_S)
    assert code == 0, log[-3000:]

    def generated(run):
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [
            (r["step"], r["reward"], r["completion_length_mean"]) for r in rows if "reward" in r
        ]

    got, want = generated(tmp_path / "two"), generated(tmp_path / "one")
    assert [s for s, _, _ in want] == [1, 3] and got == want
    a = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert set(a) == set(b) and a
    start = 0.0
    for k in b:
        if "lora_B" in k:
            start = max(start, float(b[k].abs().max()))  # B starts at zero: it moved
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    assert start > 1e-4


def test_grpo_refuses_fsdp_under_torchrun(monkeypatch):
    """FSDP shards the weights each rank decodes with: refused before the run, naming ddp."""
    from types import SimpleNamespace

    from nanotune.errors import NanotuneError
    from nanotune.jobs import grpo
    from nanotune.training import TrainConfig, dist
    from nanotune.training.rl_config import RLConfig

    cfg = SimpleNamespace(
        rl=RLConfig(algorithm="grpo", num_generations=2),
        train=TrainConfig(micro_batch_size=2, strategy="fsdp"),
    )
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(NanotuneError, match="train.strategy: ddp"):
        grpo.check(cfg, torch.nn.Linear(1, 1))
    cfg.train.strategy = "ddp"
    grpo.check(cfg, torch.nn.Linear(1, 1))  # DDP runs
    cfg.rl.num_generations = 3  # 2 rows x 2 ranks = 4 completions a step: G 3 does not divide
    with pytest.raises(NanotuneError, match=r"x 2 processes = 4"):
        grpo.check(cfg, torch.nn.Linear(1, 1))

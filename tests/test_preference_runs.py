"""Preference runs end to end: `preference:` in the config, DPO (LoRA: the adapters-off reference;
full: reference log-probs precomputed and kept with the run), a reward model, metrics and
resume, on tiny random models through `nanotune train`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nanotune.cli import main
from nanotune.config import RunConfig
from nanotune.errors import NanotuneError
from nanotune.jobs.finetune import train
from nanotune.jobs.reference import REFERENCE_FILE
from nanotune.training.preference import PreferenceObjective, layout

WORDS = "red green blue cyan black white gold pink gray brown".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs_file(path: Path, n: int = 24) -> str:
    """Questions whose chosen answer names the asked colour and whose rejected one another."""
    rows = [
        {
            "prompt": f"Which colour is {WORDS[i % 10]}?",
            "chosen": f" It is {WORDS[i % 10]}.",
            "rejected": f" It is {WORDS[(i + 3) % 10]}.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_config(tmp_path: Path, model: Path, **sections) -> Path:
    config = {
        "model": str(model),
        "data": {
            "source": pairs_file(tmp_path / "pairs.jsonl"),
            "format": "preference",
            "val_fraction": 0.25,
            "max_length": 64,
        },
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
        "train": {
            "lr": 5e-3,
            "micro_batch_size": 3,
            "grad_accum": 2,
            "max_steps": 4,
            "eval_every": 2,
            "seed": 5,
            "device": "cpu",
        },
        "output_dir": str(tmp_path / "run"),
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the config ------------------------------------------------------------------------------


def test_preference_section_is_validated_naming_the_field():
    data = {"source": "pairs.jsonl", "format": "preference"}
    cfg = RunConfig.from_dict({"data": data, "preference": {"objective": "simpo"}})
    assert cfg.preference.resolved_beta() == 2.0  # SimPO's own default scale
    assert RunConfig.from_dict({"data": data}).preference.resolved_objective() == "dpo"
    cases = {
        ("preference.objective=dpo",): "preference.objective: dpo learns from preference pairs, "
        "but data.format is completion; set data.format: preference",
        ("data.format=preference", "preference.objective=dop"): "'dop' is not one of dpo, simpo, "
        "orpo, reward (did you mean 'dpo'?)",
        ("data.format=preference", "preference.beta=0"): "preference.beta: must be > 0",
        ("data.format=preference", "preference.loss=ipo", "preference.label_smoothing=0.1"): (
            "preference.label_smoothing: applies to dpo with loss: sigmoid and to simpo"
        ),
        ("data.format=preference", "preference.label_smoothing=0.5"): "must be in [0, 0.5)",
        ("data.format=preference", "preference.objective=reward", "eval.metrics=[squad]"): (
            "eval.metrics: squad score generated text, but a reward model (preference.objective: "
            "reward) generates none; use metrics: [preference]"
        ),
    }
    for overrides, message in cases.items():
        with pytest.raises(NanotuneError, match=re.escape(message)):
            RunConfig.from_dict({"data": {"source": "x.jsonl"}}, list(overrides))
    from nanotune.eval import EvalConfig, evaluate_model

    wanted = EvalConfig(metrics=["preference"])
    with pytest.raises(NanotuneError, match="preference needs format: preference data"):
        evaluate_model(None, None, [object()], wanted, task="lm")


# ---- DPO -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_lora_dpo_through_the_cli_writes_preference_metrics(fixture, tmp_path, request, capsys):
    model = request.getfixturevalue(fixture)
    config = write_config(tmp_path, model, preference={"objective": "dpo", "beta": 0.5})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    evals = [r for r in records(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0.0 <= r["eval_reward_accuracy"] <= 1.0
        assert {"eval_reward_margin", "eval_logps_chosen", "eval_logps_rejected"} <= set(r)
    # LoRA: the reference is the base with the adapters off, so nothing is precomputed.
    assert not (run / REFERENCE_FILE).exists()
    assert (run / "final" / "adapter_config.json").is_file()
    card = (run / "final" / "README.md").read_text()
    assert "- dpo" in card and "## Objective: dpo" in card and "| `beta` | `0.5` |" in card
    steps = [r for r in records(run) if "lr" in r]
    assert len(steps) == 4 and all(r["loss"] > 0 for r in steps)
    # Step 1 starts at the reference: every DPO margin is 0, the loss log 2.
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    # Each training step logs its pairs' preference metrics (from the loss's own forward).
    for r in steps:
        assert 0.0 <= r["reward_accuracy"] <= 1.0 and r["logps_chosen"] < 0
        assert {"reward_margin", "rewards_chosen", "rewards_rejected", "logps_rejected"} <= set(r)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert "done: 4 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "preference,method",
    [
        ({"objective": "simpo", "simpo_gamma": 0.5}, {}),
        ({"objective": "orpo", "orpo_lambda": 0.2}, {"name": "last_n", "last_n": 1}),
        ({"objective": "dpo", "loss": "ipo"}, {"name": "qlora", "nf4_block": 16}),
        ({"objective": "dpo", "loss": "hinge"}, {"train_embeddings": True}),
    ],
    ids=["simpo-lora", "orpo-last_n", "ipo-qlora", "hinge-lora-embeddings"],
)
def test_every_objective_runs_from_the_config(preference, method, tmp_path, tiny_llama_dir):
    config = write_config(
        tmp_path, tiny_llama_dir, preference=preference, method=method, train={"max_steps": 2}
    )
    result = train(config, progress=False)
    assert result.step == 2 and result.train_loss > 0
    assert {"reward_accuracy", "reward_margin", "logps_chosen"} <= set(result.eval)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["preference"]
    assert {k: saved[k] for k in preference} == preference
    # DPO against a base whose embeddings train too: the reference is precomputed.
    precomputed = (tmp_path / "run" / REFERENCE_FILE).is_file()
    assert precomputed == (
        method.get("train_embeddings", False) and preference["objective"] == "dpo"
    )


def test_dpo_learns_the_preference(tmp_path, tiny_gpt2_dir):
    """Chosen and rejected answers differ only in the colour named (same length, so no length
    bias): a random model ranks them by chance; after DPO it names the asked colour."""
    config = write_config(
        tmp_path,
        tiny_gpt2_dir,
        preference={"beta": 0.5},
        method={"r": 8, "alpha": 16},
        data={"val_fraction": 0.0, "val_source": pairs_file(tmp_path / "val.jsonl", 12)},
        train={"max_steps": 30, "eval_every": 30, "lr": 2e-2, "keep_best": False},
    )
    result = train(config, progress=False)
    # The held-out pairs ask the same questions: the policy now prefers the right colour.
    assert result.eval["reward_accuracy"] >= 0.9 and result.eval["reward_margin"] > 0
    assert result.eval["loss"] < 0.5
    # Before and after, on the same held-out pairs: the policy's own ranking (log-probs).
    before, after = result.before["preference_accuracy"], result.after["preference_accuracy"]
    assert before <= 0.7 and after >= 0.9, (before, after)
    assert result.after["preference_margin"] > result.before["preference_margin"]
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["after"]["preference_accuracy"] == after
    assert (tmp_path / "run" / "report.html").is_file()


# `nanotune train` with every DPO loss slowed down, so a test can kill it mid-run.
KILL_SCRIPT = """
import os, sys, time
from nanotune.cli import main
from nanotune.training.preference import PreferenceObjective

real = PreferenceObjective.loss_and_sums


def slow(self, model, batch):
    time.sleep(float(os.environ.get("SLOW", "0")))
    return real(self, model, batch)


PreferenceObjective.loss_and_sums = slow
sys.exit(main(sys.argv[1:]))
"""


def test_full_dpo_precomputes_the_reference_once_and_sigkill_resume_is_bit_identical(
    tmp_path, tiny_gpt2_dir
):
    """Full fine-tuning keeps no reference model: the base's log-probs of every pair are stored
    in the run. A run killed (SIGKILL) mid-DPO and resumed reads them back, leaves them as they
    were, and ends with exactly the weights and metrics of an uninterrupted run."""
    overrides = {"method": {"name": "full"}, "train": {"max_steps": 6, "save_every": 2}}
    (tmp_path / "a").mkdir()
    train(write_config(tmp_path / "a", tiny_gpt2_dir, **overrides), progress=False)
    whole = tmp_path / "a" / "run"
    stored = load_file(str(whole / REFERENCE_FILE))
    assert stored["train"].shape == (18, 2) and stored["val"].shape == (6, 2)
    assert (stored["train"] < 0).all()

    (tmp_path / "b").mkdir()
    config = write_config(tmp_path / "b", tiny_gpt2_dir, **overrides)
    script = tmp_path / "slow_train.py"
    script.write_text(KILL_SCRIPT)
    command = [sys.executable, str(script), "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "b" / "run"
    proc = subprocess.Popen(
        command, env={**env, "SLOW": "0.3"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # past the step-2 checkpoint, inside step 4
        assert proc.poll() is None, proc.stderr.read().decode()
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(x.endswith("}") and json.loads(x).get("step") == 3 for x in lines):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (run / "checkpoints" / "step-2").is_dir() and not (run / "final").exists()
    reference = (run / REFERENCE_FILE).read_bytes()
    written = (run / REFERENCE_FILE).stat().st_mtime_ns

    subprocess.run([*command, "--resume"], env=env, check=True, capture_output=True)
    assert (run / REFERENCE_FILE).stat().st_mtime_ns == written  # read, not computed again
    assert (run / REFERENCE_FILE).read_bytes() == reference == (whole / REFERENCE_FILE).read_bytes()
    want = load_file(str(whole / "final" / "model.safetensors"))
    got = load_file(str(run / "final" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r.get("loss") for r in records(run)] == [r.get("loss") for r in records(whole)]


# ---- the reward model ------------------------------------------------------------------------


def trl_reward_loss(hf_model, chosen_ids: list[list[int]], rejected_ids: list[list[int]], pad_id):
    """TRL RewardTrainer's own compute_loss and collator on the same pairs (no training run)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    collate = DataCollatorForPreference(pad_token_id=pad_id)
    inputs = collate(
        [
            {"chosen_ids": c, "rejected_ids": r}
            for c, r in zip(chosen_ids, rejected_ids, strict=True)
        ]
    )
    same = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=hf_model,
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=same,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
    )
    return RewardTrainer.compute_loss(trainer, hf_model, inputs)


@pytest.mark.parametrize(
    "fixture,method",
    [
        ("tiny_gpt2_dir", {"name": "lora"}),
        ("tiny_llama_dir", {"name": "full"}),
        ("tiny_llama_dir", {"name": "qlora", "nf4_block": 16}),
    ],
    ids=["gpt2-lora", "llama-full", "llama-qlora"],
)
def test_reward_model_run_saves_what_transformers_loads_with_the_same_scores(
    fixture, method, tmp_path, request
):
    from transformers import AutoModelForSequenceClassification

    from nanotune.data.batching import collate_preference
    from nanotune.eval import RewardModel
    from nanotune.jobs import artifacts
    from nanotune.methods import SequenceClassifier

    model_dir = request.getfixturevalue(fixture)
    config = write_config(
        tmp_path,
        model_dir,
        preference={"objective": "reward"},
        method=method,
        train={"lr": 1e-2},
    )
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    evals = [r for r in records(run) if "eval_loss" in r]
    assert evals and all(0.0 <= r["eval_reward_accuracy"] <= 1.0 for r in evals)
    assert "eval_logps_chosen" not in evals[-1]  # a reward model has no policy log-probs
    steps = [r for r in records(run) if "lr" in r]
    assert steps and all(0.0 <= r["reward_accuracy"] <= 1.0 for r in steps)
    assert all("reward_margin" in r and "logps_chosen" not in r for r in steps)
    # Before/after on the validation pairs: how often the head scores chosen above rejected.
    results = json.loads((run / "eval.json").read_text())
    assert {"preference_accuracy", "preference_margin"} <= set(results["after"])
    assert "perplexity" not in results["after"]  # a reward model has no LM to measure

    final = run / "final"
    assert "AutoModelForSequenceClassification" in (final / "README.md").read_text()
    ours, tokenizer = artifacts.load(str(final))
    assert isinstance(ours, SequenceClassifier) and ours.num_labels == 1
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tokenizer.pad_id
    prompts = ["Which colour is red?", "Which colour is gold?", "Name a colour."]
    answers = [" It is red.", " It is blue, I think.", " Pink"]
    # Sequences as transformers scores them: no pad token inside (the pad is GPT-2's EOS).
    chosen = [tokenizer.encode(p + a) for p, a in zip(prompts, answers, strict=True)]
    rejected = [tokenizer.encode(p + " No idea at all.") for p in prompts]
    from nanotune.data import PreferenceExample

    pairs = [PreferenceExample(c[:3], c[3:], r[3:]) for c, r in zip(chosen, rejected, strict=True)]
    batch = collate_preference(pairs, pad_id=tokenizer.pad_id)
    # Our scores come from the pair rows (prompt once); transformers scores each whole sequence.
    sequences = [s for pair in zip(chosen, rejected, strict=True) for s in pair]
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), tokenizer.pad_id)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        our_scores = ours(batch["input_ids"], batch["ends"], **layout(batch)).flatten()
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        hf_scores = hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0]
    assert (our_scores - hf_scores).abs().max() <= 1e-4
    assert our_scores.std() > 1e-3  # the scores differ: the comparison means something
    # Bradley–Terry: our objective's mean loss is TRL RewardTrainer's on the same pairs.
    objective = PreferenceObjective("reward")
    with torch.no_grad():
        loss = objective.loss_sum(ours, batch) / objective.count(batch)
        trl = trl_reward_loss(hf, chosen, rejected, tokenizer.pad_id)
    assert abs(float(loss) - float(trl)) <= 1e-5
    # eval.reward_model can name the folder.
    scored = RewardModel(str(final)).score(prompts, answers)
    assert scored == pytest.approx(our_scores[0::2].tolist(), abs=1e-4)


def chat_pairs_file(path: Path, n: int = 24) -> str:
    """`pairs_file` as conversations: a user turn, then the chosen or rejected assistant reply."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Which colour is {WORDS[i % 10]}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {WORDS[i % 10]}."}],
            "rejected": [{"role": "assistant", "content": f"It is {WORDS[(i + 3) % 10]}."}],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "fixture,chat",
    [("tiny_llama_dir", False), ("tiny_gpt2_dir", True)],
    ids=["text-llama", "chat-markers-gpt2"],
)
def test_dpo_eval_judges_before_and_after_with_a_reward_model_nanotune_trained(
    fixture, chat, tmp_path, request
):
    """The offline demo's workflow on tiny models: a reward run, then a DPO run whose eval names
    the reward run's final/ (eval.reward_model) and gets the reward of the base's and the tuned
    policy's answers and the tuned one's win rate. The eval scores (prompt, reply) text exactly
    as the reward model was trained to score the pair: text prompts (the demo's, ending in the
    separator) and chat prompts (GPT-2 with nanotune's markers, whose end-of-turn is no pad)."""
    from nanotune.config import load_config
    from nanotune.data.batching import collate_preference
    from nanotune.eval import RewardModel
    from nanotune.jobs import artifacts
    from nanotune.jobs.finetune import _setup

    model = request.getfixturevalue(fixture)
    if chat:
        data = {"source": chat_pairs_file(tmp_path / "chat.jsonl"), "chat_style": "markers"}
    else:  # replies without a leading space, as the demo's: generations are stripped
        source = Path(pairs_file(tmp_path / "pairs.jsonl"))
        source.write_text(source.read_text().replace('": " It is', '": "It is'))
        data = {"source": str(source), "separator": "\n"}
    (tmp_path / "rm").mkdir()
    rm_config = write_config(
        tmp_path / "rm",
        model,
        preference={"objective": "reward"},
        data=data,
        train={"lr": 1e-2, "max_steps": 2},
    )
    final = train(rm_config, progress=False).final_dir
    (tmp_path / "dpo").mkdir()
    evaluation = {"metrics": ["preference", "reward"], "reward_model": str(final)}
    dpo_config = write_config(
        tmp_path / "dpo",
        model,
        preference={"beta": 0.5},
        data=data,
        train={"max_steps": 2},
        eval=evaluation | {"max_new_tokens": 6, "batch_size": 3},
    )
    result = train(dpo_config, progress=False)
    before, after = result.before, result.after
    assert {"preference_accuracy", "reward"} <= set(before) and "reward_win_rate" not in before
    assert {"preference_accuracy", "reward", "reward_win_rate"} <= set(after)
    assert 0.0 <= after["reward_win_rate"] <= 1.0 and before["reward"] != after["reward"]
    saved = json.loads((tmp_path / "dpo" / "run" / "eval.json").read_text())
    assert saved["after"]["reward_win_rate"] == after["reward_win_rate"]
    assert saved["samples"] and "after" in saved["samples"][0]

    # Held-out pairs as the eval sees them (the decoded prompt, the reply as generated text):
    # scored through eval.reward_model, they get the scores the reward objective trained on.
    setup = _setup(load_config(rm_config))
    pairs = setup.data.val
    prompts = [setup.tokenizer.decode(e.prompt) for e in pairs]
    replies = [setup.tokenizer.decode(e.chosen, skip_special=True).strip() for e in pairs]
    scored = RewardModel(str(final)).score(prompts, replies)
    ours, tokenizer = artifacts.load(str(final))
    with torch.no_grad():
        batch = collate_preference(pairs, pad_id=tokenizer.pad_id)
        trained = PreferenceObjective("reward").pairs(ours, batch)[1]
    assert trained.std() > 1e-3  # the scores differ: the comparison means something
    assert scored == pytest.approx(trained.tolist(), abs=1e-4)


def test_reward_model_saved_merged_keeps_its_adapters(tmp_path):
    """Saving merges a LoRA reward model's adapters in place (NF4 cannot be copied) and puts
    them back: the model goes on scoring exactly as before, adapters and all."""
    from tiny import tiny_config

    from nanotune.jobs.artifacts import save_final
    from nanotune.methods import MethodConfig, SequenceClassifier, apply_method, lora_layers
    from nanotune.models import Transformer
    from nanotune.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    body = Transformer(tiny_config("gpt2", vocab_size=50257))
    model = apply_method(SequenceClassifier(body, 1), MethodConfig(name="lora", r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    ids, lengths = torch.randint(0, 50257, (3, 9)), torch.tensor([9, 5, 2])
    with torch.no_grad():
        before = model(ids, lengths)
    config = RunConfig.from_dict({"data": {"source": "x.jsonl", "format": "preference"}})
    adapted = list(lora_layers(model.body))
    assert adapted
    save_final(model.eval(), gpt2_tokenizer(), config, tmp_path / "final")
    with torch.no_grad():
        assert torch.equal(model(ids, lengths), before)
    assert list(lora_layers(model.body)) == adapted
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"]

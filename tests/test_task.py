"""The task (lm or classification): decided once from the data config, read by every consumer;
and the preparation and comparison fine-tune and eval share (jobs/prepare.py, compare_models)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nanotune.config import ModelSection, RunConfig
from nanotune.data import DataConfig, build_datasets, epoch_batches
from nanotune.eval import EvalConfig, Generations, compare_models, evaluate_model
from nanotune.jobs import artifacts
from nanotune.jobs.prepare import prepare_model
from nanotune.methods import MethodConfig, SequenceClassifier
from nanotune.training import objective_for
from nanotune.weights import load_model
from nanotune.weights.classifier import CLASSIFIER_FILE

SRC = Path(__file__).parents[1] / "src" / "nanotune"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sms_rows() -> list[dict]:
    return [{"text": f"win {i} prize", "label": "spam"} for i in range(4)] + [
        {"text": f"lunch at {i}?", "label": "ham"} for i in range(4)
    ]


def qa_rows() -> list[dict]:
    return [{"prompt": f"Q: {i}+{i}?", "completion": f" {2 * i}"} for i in range(8)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["classification", "completion"])
def test_the_task_flows_from_the_data_config_to_every_consumer(tmp_path, tiny_gpt2_dir, fmt):
    classify = fmt == "classification"
    source = write_jsonl(tmp_path / "d.jsonl", sms_rows() if classify else qa_rows())
    model, tok = load_model(str(tiny_gpt2_dir))
    data_cfg = DataConfig(source=str(source), format=fmt)
    data = build_datasets(data_cfg, tok)
    assert data.task == ("classification" if classify else "lm")

    prepared = prepare_model(model, tok, data, seed=0)
    assert isinstance(prepared, SequenceClassifier) == classify
    if classify:
        assert prepared.label_names == data.label_names == ["ham", "spam"]
    (batch, *_) = epoch_batches(data.train, 4, 0, 0, task=data.task, pad_id=tok.eos_id)
    assert ("class_labels" in batch) == classify and ("targets" in batch) != classify
    objective = objective_for(data.task)
    assert objective.name == data.task
    assert math.isfinite(objective.loss_sum(prepared, batch).item())
    metric = "accuracy" if classify else "perplexity"
    cfg = EvalConfig(metrics=[metric], split="train")
    metrics, _ = evaluate_model(
        prepared, tok, data.train, cfg, task=data.task, label_names=data.label_names
    )
    assert metric in metrics
    run = RunConfig(data=data_cfg, model=ModelSection(name=str(tiny_gpt2_dir)))
    final = artifacts.save_final(prepared, tok, run, tmp_path / "final")
    assert (final / CLASSIFIER_FILE).is_file() == classify


def test_objective_for_names_the_known_tasks():
    with pytest.raises(ValueError, match="known: lm, classification"):
        objective_for("regression")


@pytest.mark.slow
def test_prepare_grows_the_vocabulary_and_notes_untrained_embeddings_once(
    tmp_path, tiny_gpt2_dir, capsys
):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "yo"},
            ]
        }
        for i in range(4)
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(source=str(source), format="chat", chat_style="markers")
    notes = {}
    for method in (MethodConfig(name="lora"), MethodConfig(name="full"), None):
        model, tok = load_model(str(tiny_gpt2_dir))
        before = model.config.vocab_size
        data = build_datasets(cfg, tok)
        assert data.task == "lm" and data.added_tokens and tok.vocab_size > before
        prepared = prepare_model(model, tok, data, seed=0, method=method)
        assert prepared is model and prepared.wte.weight.shape[0] == tok.vocab_size
        notes[method and method.name] = capsys.readouterr().out
    assert notes["lora"].count("tokens were added") == 1
    assert notes["full"] == notes[None] == ""  # full trains them; an evaluation trains nothing


@pytest.mark.slow
def test_prepare_classifier_head_depends_on_the_seed_alone(tmp_path, tiny_gpt2_dir):
    source = write_jsonl(tmp_path / "sms.jsonl", sms_rows())
    heads = []
    for seed, noise in ((1, 0), (1, 5), (2, 0)):
        model, tok = load_model(str(tiny_gpt2_dir))
        data = build_datasets(DataConfig(source=str(source), format="classification"), tok)
        torch.manual_seed(noise)
        rng = torch.get_rng_state()
        heads.append(prepare_model(model, tok, data, seed=seed).score.weight.detach().clone())
        assert torch.equal(torch.get_rng_state(), rng)  # the global stream is left as it was
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


class LengthReward:  # longer responses score higher
    def score(self, prompts, responses, batch_size=8):
        return [float(len(r)) for r in responses]


def test_compare_models_scores_rewards_for_one_model_or_two():
    gens_b = Generations(["p1", "p2"], ["r1", "r2"], ["a", "bbb"])
    gens_a = Generations(["p1", "p2"], ["r1", "r2"], ["aa", "b"])
    cfg = EvalConfig(metrics=["exact_match", "reward"], reward_model="unused", num_samples=1)
    alone = compare_models(({"exact_match": 0.0}, gens_b), None, cfg, LengthReward())
    assert alone.before == {"exact_match": 0.0, "reward": 2.0} and alone.after == {}
    assert alone.samples == [{"prompt": "p1", "reference": "r1", "before": "a"}]
    both = compare_models(({}, gens_b), ({}, gens_a), cfg, LengthReward())
    assert both.before == {"reward": 2.0}
    assert both.after == {"reward": 1.5, "reward_win_rate": 0.5}
    assert both.samples[0]["after"] == "aa"
    ppl = EvalConfig(metrics=["perplexity"])
    plain = compare_models(({"perplexity": 2.0}, None), ({"perplexity": 1.5}, None), ppl)
    assert (plain.before, plain.after, plain.samples) == (
        {"perplexity": 2.0},
        {"perplexity": 1.5},
        [],
    )


# The old ways of asking "is this a classification run?": each consumer reads the task instead.
REDERIVATIONS = {
    r"isinstance\([^)]*ClassExample": set(),  # the type of the examples
    r"""["']class_labels["'] in """: set(),  # the keys of a batch
    r"\.label_names is (not )?None": {"data"},  # data/ reads its own config's label names
    r"format [!=]= ['\"]classification['\"]": {"data/config.py", "data/pipeline.py"},
}


def test_the_task_is_not_re_derived():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        text = path.read_text()
        for pattern, allowed in REDERIVATIONS.items():
            if rel in allowed or rel.split("/")[0] in allowed:
                continue
            found += [f"{rel}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert found == []


def test_formats_are_decided_by_their_table_only():
    """What a format is (its task, chunking, caching, default metrics) is read from
    data/formats.py's FORMATS; no other module compares a format to a format's name."""
    from nanotune.data.formats import FORMATS

    names = "|".join(FORMATS)
    compares = re.compile(
        rf"""format["')\]]* *(?:[!=]=|(?:not )?in) *[(\[{{]?["'](?:{names})["']"""
    )
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel != "data/formats.py":
            found += [f"{rel}: {m.group(0)}" for m in compares.finditer(path.read_text())]
    assert found == []
    assert compares.search('if cfg.format in ("classification", "preference")')
    assert compares.search('data.get("format") == "preference"')

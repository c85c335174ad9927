"""Several sources mixed into one training set (data.sources): exact, seeded shares of each
epoch, the same order after a SIGKILL and --resume, and bad entries named by index and field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanotune.config import RunConfig
from nanotune.data import DataConfig, build_datasets
from nanotune.data.batching import epoch_batches
from nanotune.data.mix import epoch_examples
from nanotune.errors import NanotuneError
from nanotune.tokenizer import gpt2_tokenizer


def _write(path: Path, word: str, n: int) -> str:
    rows = [{"prompt": f"{word} {i}:", "completion": f" {word}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _mix(tmp_path: Path, **data) -> DataConfig:
    return DataConfig(
        sources=[
            {"source": _write(tmp_path / "apple.jsonl", "apple", 300), "weight": 0.75},
            {"source": _write(tmp_path / "banana.jsonl", "banana", 700), "weight": 0.25},
        ],
        **data,
    )


@pytest.mark.slow
def test_weights_are_the_shares_of_every_epoch(tmp_path):
    """0.75/0.25 over sources of 300 and 700 rows: every epoch's batches hold 750 apple and 250
    banana examples (apple repeated 2.5 times, banana sampled), a new seeded draw each epoch."""
    tok = gpt2_tokenizer()
    data = build_datasets(_mix(tmp_path), tok)
    first = {tok.encode("apple")[0]: "apple", tok.encode("banana")[0]: "banana"}
    assert [(p.examples, p.per_epoch) for p in data.sources] == [(300, 750), (700, 250)]
    draws = []
    for epoch in range(3):
        batches = epoch_batches(
            epoch_examples(data.train, data.sources, 0, epoch), 16, 0, epoch, pad_id=tok.pad_id
        )
        seen = Counter()
        rows = []
        for batch in batches:
            for row in batch["input_ids"].tolist():
                seen[first[row[0]]] += 1
                rows.append(tuple(t for t in row if t != tok.pad_id))
        total = sum(seen.values())
        assert total == 1000
        assert (
            abs(seen["apple"] / total - 0.75) < 0.01 and abs(seen["banana"] / total - 0.25) < 0.01
        )
        bananas = [r for r in rows if first[r[0]] == "banana"]
        assert len(set(bananas)) == len(bananas) == 250  # sampled without repeats
        apples = Counter(r for r in rows if first[r[0]] == "apple")
        assert len(apples) == 300 and sorted(set(apples.values())) == [
            2,
            3,
        ]  # 2.5x: whole, then a half
        draws.append(sorted(bananas))
    assert draws[0] != draws[1] != draws[2]  # each epoch draws anew (seeded: same run, same draw)


@pytest.mark.slow
def test_fraction_entries_and_counts_in_summary_cache_and_held_out(tmp_path):
    tok = gpt2_tokenizer()
    cfg = DataConfig(
        sources=[
            {"source": _write(tmp_path / "a.jsonl", "apple", 100), "fraction": 0.5},
            {"source": _write(tmp_path / "b.jsonl", "banana", 50), "fraction": 2.0},
            {"source": _write(tmp_path / "c.jsonl", "cherry", 10)},  # fraction 1
        ],
        val_fraction=0.1,
    )
    data = build_datasets(cfg, tok)
    assert [(p.rows, p.per_epoch) for p in data.sources] == [(90, 45), (45, 90), (9, 9)]
    assert data.stats["train"]["examples"] == 144 and data.stats["val"]["examples"] == 16
    summary = data.summary()
    assert "sources[1] " in summary and "90 an epoch (62.5%, fraction 2)" in summary
    again = build_datasets(cfg, gpt2_tokenizer())
    assert again.cached is not None and again.sources == data.sources  # read back from the cache
    # The cache keys on the mix: a changed share, or a changed source file, builds anew.
    moved = DataConfig(
        sources=[
            {**s.__dict__, "fraction": 0.25 if i == 0 else s.fraction}
            for i, s in enumerate(cfg.sources)
        ],
        val_fraction=0.1,
    )
    assert build_datasets(moved, gpt2_tokenizer()).cached is None
    _write(tmp_path / "c.jsonl", "cherry", 11)
    assert build_datasets(cfg, gpt2_tokenizer()).cached is None


@pytest.mark.parametrize(
    "entry, says",
    [
        (
            {"source": "a.jsonl", "wieght": 1},
            r"^data\.sources\[1\]\.wieght: unknown key; did you mean 'weight'\?",
        ),
        (
            {"source": "a.jsonl", "weight": 0},
            r"^data\.sources\[1\]\.weight: 0(\.0)? must be a number > 0$",
        ),
        ({"source": "a.jsonl", "weight": -2}, r"^data\.sources\[1\]\.weight: -2"),
        ({"source": "a.jsonl", "fraction": 0}, r"^data\.sources\[1\]\.fraction: 0(\.0)? must be"),
        (
            {"source": "a.jsonl", "weight": 1, "fraction": 0.5},
            r"^data\.sources\[1\]\.weight: give weight .* not both$",
        ),
        ({"weight": 1}, r"^data\.sources\[1\]\.source: required"),
        (
            {"source": "a.jsonl", "format": "classification"},
            r"^data\.sources\[1\]\.format: classification trains classification, but data\.format "
            r"completion trains lm; mixed sources train one task",
        ),
        (
            {"source": "a.jsonl", "format": "sharegpt"},
            r"^data\.sources\[1\]\.format: 'sharegpt' is not one of",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_index_and_field(entry, says):
    good = {"source": "b.jsonl", "weight": 1}
    for build in (
        lambda: DataConfig(sources=[good, entry]),  # in code
        lambda: RunConfig.from_dict({"data": {"sources": [good, entry]}}),  # from a recipe
    ):
        with pytest.raises(NanotuneError, match=says) as e:
            build()
        assert "\n" not in str(e.value)


def _rows_file(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_classification_sources_mix_with_every_sources_class_names(tmp_path):
    """Two classification sources with their own columns and classes: the class names are all
    of theirs, and each epoch takes 2:1 of them (a list split, drawn as a store is)."""
    tok = gpt2_tokenizer()
    sms = [{"sms": f"win {i} now", "kind": "spam" if i % 2 else "ham"} for i in range(40)]
    news = [{"text": f"story {i}", "label": "news"} for i in range(20)]
    cfg = DataConfig(
        format="classification",
        sources=[
            {
                "source": _rows_file(tmp_path / "sms.jsonl", sms),
                "weight": 2,
                "columns": {"text": "sms", "label": "kind"},
            },
            {"source": _rows_file(tmp_path / "news.jsonl", news), "weight": 1},
        ],
    )
    data = build_datasets(cfg, tok)
    assert data.label_names == ["ham", "news", "spam"] and data.task == "classification"
    assert [(p.examples, p.per_epoch) for p in data.sources] == [(40, 40), (20, 20)]
    epoch = epoch_examples(data.train, data.sources, 0, 0)
    assert Counter(data.label_names[e.label] for e in epoch) == {"ham": 20, "spam": 20, "news": 20}
    moved = DataConfig(
        format="classification", sources=[{**cfg.sources[0].__dict__, "weight": 5}, cfg.sources[1]]
    )
    moved_data = build_datasets(moved, tok)
    epoch = epoch_examples(moved_data.train, moved_data.sources, 0, 1)
    assert Counter(data.label_names[e.label] for e in epoch)["news"] == 10  # 60 * 1/6
    batches = epoch_batches(epoch, 8, 0, 1, task="classification", pad_id=tok.pad_id)
    assert sum(b["n_examples"] for b in batches) == 60


def test_preference_sources_mix(tmp_path):
    tok = gpt2_tokenizer()
    pairs = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(30)]
    more = [{"question": f"R{i}?", "chosen": " up", "rejected": " down"} for i in range(10)]
    cfg = DataConfig(
        format="preference",
        sources=[
            {"source": _rows_file(tmp_path / "p.jsonl", pairs), "fraction": 0.5},
            {
                "source": _rows_file(tmp_path / "q.jsonl", more),
                "fraction": 3,
                "columns": {"prompt": "question"},
            },
        ],
        val_fraction=0.2,
    )
    data = build_datasets(cfg, tok)
    assert [(p.examples, p.per_epoch) for p in data.sources] == [(24, 12), (8, 24)]
    assert len(data.val) == 8 and data.task == "preference"
    epoch = epoch_examples(data.train, data.sources, 4, 2)
    ups = sum(e.chosen[0] == tok.encode(" up")[0] for e in epoch)
    assert len(epoch) == 36 and ups == 24


def test_source_and_sources_exclude_each_other():
    with pytest.raises(NanotuneError, match=r"^data\.sources: give data\.source or data\.sources"):
        DataConfig(source="a.jsonl", sources=[{"source": "b.jsonl"}])


# --- SIGKILL + --resume ----------------------------------------------------------------------

# Trains a tiny GPT-2 LoRA on a two-source mix through nanotune.train; every training batch it
# reads is appended to order.txt (a digest of its token ids) and takes 0.15 s, so the
# parent can kill it mid-run.
SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys, time
    import nanotune
    import nanotune.data.batching as batching

    make = batching.epoch_batches
    def recorded(*args, shuffle=True, **kwargs):  # training epochs (evaluation does not shuffle)
        batches = make(*args, shuffle=shuffle, **kwargs)
        if shuffle:
            collate = batches._collate
            def record(chunk):
                batch = collate(chunk)
                digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]
                with open(os.path.join(sys.argv[2], "order.txt"), "a") as f:
                    f.write(digest + "\\n")
                    f.flush()
                    os.fsync(f.fileno())
                time.sleep(float(os.environ.get("SLOW", "0")))
                return batch
            batches._collate = record
        return batches
    batching.epoch_batches = recorded

    data, run = sys.argv[1], sys.argv[2]
    recipe = {
        "model": os.environ["TINY_GPT2"],
        "method": {"name": "lora", "r": 2},
        "data": {"sources": [{"source": f"{data}/apple.jsonl", "weight": 0.75},
                             {"source": f"{data}/banana.jsonl", "weight": 0.25}],
                 "max_length": 32, "val_fraction": 0.1},
        "train": {"max_steps": 14, "micro_batch_size": 8, "lr": 1e-3, "save_every": 3,
                  "seed": 5},
        "eval": {"metrics": ["perplexity"], "max_examples": 4},
        "output_dir": os.path.join(run, "run"),
    }
    nanotune.train(recipe, resume="--resume" in sys.argv, progress=False)
    """
)


def _start(script: Path, data: Path, run: Path, *flags: str, slow: str = "0") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW": slow}
    return subprocess.Popen(
        [sys.executable, str(script), str(data), str(run), *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _order(run: Path) -> list[str]:
    path = run / "order.txt"
    return [x for x in path.read_text().splitlines() if len(x) == 16] if path.exists() else []


@pytest.mark.slow
def test_sigkill_then_resume_trains_the_same_mixed_order(tmp_path, tiny_gpt2_dir, monkeypatch):
    """A real SIGKILL (no warning, no checkpoint on the way out) after the first checkpoint,
    then --resume: the batches trained are exactly the uninterrupted run's, in order, and so
    are the final adapter weights; the report and model card show each source's share."""
    from safetensors.torch import load_file

    monkeypatch.setenv("TINY_GPT2", str(tiny_gpt2_dir))
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "apple.jsonl", "apple", 30)
    _write(data / "banana.jsonl", "banana", 70)
    script = tmp_path / "mix_run.py"
    script.write_text(SCRIPT)

    whole = tmp_path / "whole"
    whole.mkdir()
    proc = _start(script, data, whole)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    want = _order(whole)
    assert len(want) == 14

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = _start(script, data, killed, slow="0.15")
    ckpts, deadline = killed / "run" / "checkpoints", time.time() + 300
    # Past the first checkpoint (step 3) and into the steps after it.
    while len(_order(killed)) < 5 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before_kill = _order(killed)
    assert 5 <= len(before_kill) < 14 and any(ckpts.iterdir())
    (killed / "order.txt").unlink()
    proc = _start(script, data, killed, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    after_resume = _order(killed)
    resumed_at = 14 - len(after_resume)  # the checkpoint's step
    assert 3 <= resumed_at < len(before_kill)  # steps after it were trained again
    assert before_kill[:resumed_at] + after_resume == want  # bit-identical order
    assert before_kill[resumed_at:] == want[resumed_at : len(before_kill)]

    got = load_file(str(killed / "run" / "final" / "adapter_model.safetensors"))
    ref = load_file(str(whole / "run" / "final" / "adapter_model.safetensors"))
    assert got.keys() == ref.keys() and all((got[k] == ref[k]).all() for k in ref)
    card = (killed / "run" / "final" / "README.md").read_text()
    assert "| training source | rows | examples | per epoch |" in card
    assert "apple.jsonl` | 27 | 27 | 68 (75.6%) |" in card  # 10% of each held out as val
    report = (killed / "run" / "report.html").read_text()
    assert (
        "training sources, an epoch" in report
        and "banana.jsonl 22 (24.4%, of 63 examples)" in report
    )


def test_streamed_sources_interleave_by_weight_and_resume_at_the_same_row(tmp_path):
    """data.streaming with data.sources: 0.75/0.25 over 400 examples within 1% (each source
    starting again when it ends; interleaved within one example of the shares, then through
    the shuffle buffer), counted per source as trained; batch k read anew equals batch k."""
    tok = gpt2_tokenizer()
    cfg = _mix(tmp_path, streaming=True, shuffle_buffer=16)
    data = build_datasets(cfg, tok)
    first = {tok.encode("apple")[0]: "apple", tok.encode("banana")[0]: "banana"}
    batches = data.train.batches(8, 3, 50, pad_id=tok.pad_id, shuffle_buffer=16)
    seen = [batches[k] for k in range(50)]
    counts = Counter(first[row[0]] for b in seen for row in b["input_ids"].tolist())
    assert abs(counts["apple"] / 400 - 0.75) < 0.01 and abs(counts["banana"] / 400 - 0.25) < 0.01
    trained = {p.source.rsplit("/", 1)[-1]: p.per_epoch for p in data.train.parts()}
    assert trained == {"apple.jsonl": counts["apple"], "banana.jsonl": counts["banana"]}
    assert "sources[0] " in data.summary() and " trained on (" in data.summary()
    for k in (0, 21, 49):
        again = data.train.batches(8, 3, 50, pad_id=tok.pad_id, shuffle_buffer=16)[k]
        assert torch.equal(again["input_ids"], seen[k]["input_ids"])
    with pytest.raises(NanotuneError, match=r"^data\.sources\[0\]\.fraction: a stream's size"):
        DataConfig(sources=[{"source": "a.jsonl", "fraction": 0.5}], streaming=True)


@pytest.mark.slow
def test_a_streamed_mix_trains_with_a_given_val_source(tmp_path, tiny_gpt2_dir):
    """nanotune.train on two streamed sources and a val_source: the model card and the report
    count each source's examples trained on (4 steps of 4 at 3:1 is 12 and 4)."""
    import nanotune

    data = tmp_path / "data"
    data.mkdir()
    recipe = {
        "model": str(tiny_gpt2_dir),
        "method": {"name": "lora", "r": 2},
        "data": {
            "sources": [
                {"source": _write(data / "apple.jsonl", "apple", 30), "weight": 3},
                {"source": _write(data / "banana.jsonl", "banana", 70), "weight": 1},
            ],
            "val_source": _write(data / "cherry.jsonl", "cherry", 6),
            "streaming": True,
            "shuffle_buffer": 0,
            "max_length": 32,
        },
        "train": {"max_steps": 4, "micro_batch_size": 4},
        "eval": {"metrics": ["perplexity"]},
        "output_dir": str(tmp_path / "run"),
    }
    result = nanotune.train(recipe, progress=False)
    card = (result.final_dir / "README.md").read_text()
    assert "apple.jsonl` | 12 | 12 | 12 (75.0%) |" in card
    report = result.report.read_text()
    assert "banana.jsonl 4 (25.0%, of 4 examples)" in report

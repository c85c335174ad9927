"""Streamed training data (data.streaming): rows tokenized as they arrive, the same batches as
the same rows from a file, a resumed run continuing at the same row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanotune.data import DataConfig, build_datasets
from nanotune.data.batching import collate_lm, epoch_batches
from nanotune.data.sources import python_sources
from nanotune.errors import NanotuneError
from nanotune.tokenizer import gpt2_tokenizer

datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": f"Question {i}: what is {i} times 3?", "completion": f" {3 * i}"} for i in range(23)
]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _streamed(tok, given, **options):
    cfg = DataConfig(source="python:train", streaming=True, **options)
    return build_datasets(cfg, tok, python_sources({"train": given})).train


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_an_iterable_dataset_batches_as_the_file_rows_do(tmp_path, pack):
    """A datasets IterableDataset built locally, and load_dataset(json, streaming=True) of the
    file, give the first batches the same rows from the file make without streaming, in the
    file's order (shuffle_buffer: 0): the same ids, labels and padding or packing."""
    tok = gpt2_tokenizer()
    path = _write(tmp_path / "rows.jsonl", ROWS)
    flat = build_datasets(DataConfig(source=path), tok).train
    kw = dict(pad_id=tok.pad_id, pack=pack, max_length=40)
    want = epoch_batches(flat, 4, 0, 0, shuffle=False, **kw)
    for given in (
        datasets.Dataset.from_list(ROWS).to_iterable_dataset(),
        datasets.load_dataset("json", data_files=path, split="train", streaming=True),
    ):
        assert isinstance(given, datasets.IterableDataset)
        got = _streamed(tok, given, shuffle_buffer=0).batches(4, 0, 3, shuffle_buffer=0, **kw)
        assert all(_same(got[k], want[k]) for k in range(min(3, len(want))))
    from_file = build_datasets(DataConfig(source=path, streaming=True), tok).train
    assert _same(from_file.batches(4, 0, 1, **kw)[0], want[0])


def test_text_documents_are_cut_as_the_store_cuts_them(tmp_path):
    tok = gpt2_tokenizer()
    docs = [{"text": " ".join(f"word{j}" for j in range(i * 7 + 3))} for i in range(9)]
    path = _write(tmp_path / "docs.jsonl", docs)
    flat = build_datasets(DataConfig(source=path, format="text", chunk_tokens=16), tok).train
    got = _streamed(tok, docs, format="text", chunk_tokens=16, shuffle_buffer=0)
    batches = got.batches(len(flat), 0, 1, pad_id=tok.pad_id)
    assert _same(batches[0], collate_lm([[e] for e in flat], tok.pad_id, False))


def test_a_resumed_stream_continues_at_the_same_row():
    """Batch k asked of a new reader (a resumed run) equals batch k read in order, across the
    end of the stream (the next pass reshuffles) and through the shuffle buffer; the counts
    are counted once."""
    tok = gpt2_tokenizer()
    ids = datasets.Dataset.from_list(ROWS).to_iterable_dataset()
    stream = _streamed(tok, ids, shuffle_buffer=5)
    in_order = stream.batches(4, 7, 14, pad_id=tok.pad_id, shuffle_buffer=5)
    seen = [in_order[k] for k in range(14)]
    assert 46 < stream.stats["rows"] <= 69  # 6 batches a pass (23 rows): into the third pass
    for k in (0, 5, 6, 13):
        fresh = stream.batches(4, 7, 14, pad_id=tok.pad_id, shuffle_buffer=5)
        assert _same(fresh[k], seen[k])
    first_pass = [r for b in seen[:6] for r in b["input_ids"].tolist()]
    second_pass = [r for b in seen[6:12] for r in b["input_ids"].tolist()]
    assert sorted(first_pass) == sorted(second_pass) and first_pass != second_pass


def _recipe(tmp_path: Path, model: Path, out: str, **data) -> dict:
    return {
        "model": str(model),
        "method": {"name": "lora", "r": 2},
        "data": {"max_length": 32, "streaming": True, **data},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "save_every": 3, "seed": 2},
        "output_dir": str(tmp_path / out),
    }


def _steps(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_from_an_iterable_dataset_and_a_resumed_stream(tmp_path, tiny_gpt2_dir):
    """nanotune.train on an IterableDataset trains on the same batches (same losses, the same
    adapter) as on the file's rows streamed; a run resumed from its step-3 checkpoint ends with
    the uninterrupted run's adapter bit for bit."""
    from safetensors.torch import load_file

    import nanotune

    path = _write(tmp_path / "rows.jsonl", ROWS)
    ids = datasets.Dataset.from_list(ROWS).to_iterable_dataset()
    a = nanotune.train(_recipe(tmp_path, tiny_gpt2_dir, "a"), data={"train": ids}, progress=False)
    b = nanotune.train(_recipe(tmp_path, tiny_gpt2_dir, "b", source=path), progress=False)
    losses = [s["loss"] for s in _steps(a.run_dir) if "loss" in s]
    assert len(losses) == 6 and losses == [s["loss"] for s in _steps(b.run_dir) if "loss" in s]
    adapter = "adapter_model.safetensors"
    want = load_file(str(a.final_dir / adapter))
    got = load_file(str(b.final_dir / adapter))
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Back to the step-3 checkpoint, as if killed after it; --resume reads rows 12.. again.
    for ckpt in (b.run_dir / "checkpoints").iterdir():
        if ckpt.name != "step-3":
            shutil.rmtree(ckpt)
    shutil.rmtree(b.final_dir)
    again = nanotune.train(
        _recipe(tmp_path, tiny_gpt2_dir, "b", source=path), resume=True, progress=False
    )
    got = load_file(str(again.final_dir / adapter))
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize(
    "data, train, says",
    [
        (
            {},
            {},
            r"^data\.streaming: a stream has no known length, so the run needs train\.max_steps",
        ),
        ({"val_fraction": 0.1}, {"max_steps": 2}, r"^data\.val_fraction: a stream cannot be split"),
        (
            {"format": "classification"},
            {"max_steps": 2},
            r"^data\.streaming: streams language-model formats",
        ),
    ],
)
def test_what_a_stream_cannot_do_is_said_before_loading(tmp_path, data, train, says):
    import nanotune

    recipe = {
        "model": str(tmp_path / "no-such-model"),  # never reached
        "data": {"source": "rows.jsonl", "streaming": True, **data},
        "train": train,
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(NanotuneError, match=says):
        nanotune.train(recipe, progress=False)


def test_a_stream_with_no_examples_is_one_clear_error():
    tok = gpt2_tokenizer()
    stream = _streamed(tok, ROWS, max_length=4)  # every row too long: dropped
    with pytest.raises(NanotuneError, match=r"^python:train: the stream gave no training examples"):
        stream.batches(4, 0, 2, pad_id=tok.pad_id)[0]
    assert stream.stats["dropped_too_long"] == 23


def test_an_hf_source_streams_an_iterable_dataset(tmp_path, monkeypatch):
    """hf:<id>:<split> with streaming: load_dataset(..., streaming=True), called when training
    asks for the first batch (nothing is read before), and its rows batch as the file's do."""
    from nanotune.data import sources

    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list(ROWS).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: True)
    tok = gpt2_tokenizer()
    cfg = DataConfig(source="hf:someone/rows:train", streaming=True, shuffle_buffer=0)
    stream = build_datasets(cfg, tok).train
    assert calls == []
    got = stream.batches(4, 0, 2, pad_id=tok.pad_id)
    flat = build_datasets(DataConfig(source=_write(tmp_path / "rows.jsonl", ROWS)), tok).train
    want = epoch_batches(flat, 4, 0, 0, shuffle=False, pad_id=tok.pad_id)
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert calls == [("someone/rows", None, "train", True)]


def test_nanotune_eval_refuses_a_streamed_split(tmp_path, tiny_gpt2_dir):
    from nanotune.eval.config import EvalConfig
    from nanotune.jobs.evaluate import evaluate_job

    cfg = DataConfig(source=_write(tmp_path / "rows.jsonl", ROWS), streaming=True)
    with pytest.raises(NanotuneError, match=r"^eval\.split: train is read as a stream"):
        evaluate_job(str(tiny_gpt2_dir), cfg, EvalConfig(split="train"))

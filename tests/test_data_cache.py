"""The compact example store and the tokenized-data cache: what is read back equals what was built,
and any change to the data, the options or the tokenizer builds anew."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanotune.data import DataConfig, build_datasets
from nanotune.data.batching import epoch_batches
from nanotune.data.example import Example
from nanotune.data.store import ExampleStore
from nanotune.tokenizer import gpt2_tokenizer


def _chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(n)
    ]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.ids == y.ids and x.labels == y.labels for x, y in zip(a, b, strict=True)
    )


def test_the_store_reads_back_every_example_and_batches_as_lists_do():
    g = np.random.default_rng(0)
    examples = []
    for n in g.integers(1, 30, size=40):
        ids = g.integers(0, 50_000, size=n).tolist()
        cut = int(g.integers(0, n))
        examples.append(Example(ids, [-100] * cut + ids[cut:]))
    store = ExampleStore.build(iter(examples))
    assert len(store) == 40 and store.lengths.tolist() == [len(e.ids) for e in examples]
    assert _same(store, examples) and _same(store[3:9], examples[3:9])
    assert store[-1].ids == examples[-1].ids
    with pytest.raises(IndexError):
        store[40]
    assert store.nbytes < 6 * int(store.lengths.sum()) + 8 * 41  # 5 bytes a token, offsets
    for pack in (False, True):
        kw = dict(pad_id=0, pack=pack, max_length=64, group_by_length=not pack)
        ours, ref = epoch_batches(store, 4, 3, 1, **kw), epoch_batches(examples, 4, 3, 1, **kw)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            assert a.keys() == b.keys()
            assert all((a[k] == b[k]).all() if hasattr(a[k], "shape") else a[k] == b[k] for k in a)


def test_the_store_refuses_a_label_that_is_not_its_token():
    with pytest.raises(ValueError, match="example 1: label 7 on token 3"):
        ExampleStore.build([Example([1, 2], [1, 2]), Example([3], [7])])


@pytest.mark.slow
def test_a_second_build_reads_the_cache_and_replays_the_tokenizer_changes(tmp_path):
    cfg = DataConfig(
        source=_write(tmp_path / "chat.jsonl", _chat_rows(30)),
        format="chat",
        chat_style="markers",
        val_fraction=0.2,
    )
    tok = gpt2_tokenizer()
    first = build_datasets(cfg, tok)
    assert first.cached is None and first.added_tokens  # the markers were added to the vocab
    fresh = gpt2_tokenizer()
    second = build_datasets(cfg, fresh)
    assert second.cached is not None and second.cached.is_dir()
    assert f"read from the data cache: {second.cached}" in second.summary()
    assert "data cache" not in first.summary()
    assert second.task == "lm" and second.splits.keys() == first.splits.keys()
    for name in first.splits:
        assert _same(second.splits[name], first.splits[name])
    assert second.stats == first.stats and second.added_tokens == first.added_tokens
    # The tokenizer leaves as the first build left its own: markers and chat template.
    assert fresh.special_tokens == tok.special_tokens
    assert fresh.chat_template == tok.chat_template and fresh.vocab_size == tok.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("change", ["file", "options", "tokenizer"])
def test_any_change_to_data_options_or_tokenizer_builds_anew(tmp_path, change):
    source = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(12)]
    cfg = DataConfig(source=_write(source, rows), val_fraction=0.0)
    assert build_datasets(cfg, gpt2_tokenizer()).cached is None
    assert build_datasets(cfg, gpt2_tokenizer()).cached is not None
    tok = gpt2_tokenizer()
    if change == "file":  # same size, same name: only the content tells
        _write(source, [{"prompt": f"R{i}", "completion": f" B{i}"} for i in range(12)])
    elif change == "options":
        cfg = DataConfig(source=str(source), val_fraction=0.0, separator=" =>")
    else:
        tok.add_special_tokens(["<|extra|>"])
    again = build_datasets(cfg, tok)
    assert again.cached is None
    if change == "file":
        assert tok.decode(again.train[0].ids).startswith("R")


@pytest.mark.slow
def test_a_damaged_entry_is_rebuilt_and_the_off_switch_writes_nothing(tmp_path, monkeypatch):
    cfg = DataConfig(
        source=_write(tmp_path / "r.jsonl", [{"prompt": "Q", "completion": " A"}] * 5),
        val_fraction=0.0,
    )
    built = list(build_datasets(cfg, gpt2_tokenizer()).train)  # read now: it maps the entry
    entry = build_datasets(cfg, gpt2_tokenizer()).cached
    (entry / "train.ids.npy").write_bytes(b"not numpy")
    rebuilt = build_datasets(cfg, gpt2_tokenizer())
    assert rebuilt.cached is None and _same(rebuilt.train, built)
    assert build_datasets(cfg, gpt2_tokenizer()).cached == entry  # written anew
    monkeypatch.setenv("NANOTUNE_DATA_CACHE", "off")
    other = DataConfig(source=cfg.source, val_fraction=0.0, separator=" ->")
    assert build_datasets(other, gpt2_tokenizer()).cached is None
    assert build_datasets(other, gpt2_tokenizer()).cached is None


@pytest.mark.parametrize(
    "options",
    [
        dict(val_fraction=0.1, test_fraction=0.1),
        dict(val_fraction=0.1, limit=40),  # counted first, only the kept rows formatted
        dict(val_fraction=0.0, limit=40),
        dict(format="text", val_fraction=0.1, chunk_tokens=16),
    ],
    ids=["fractions", "limit", "limit-no-split", "text"],
)
@pytest.mark.slow
def test_lm_rows_are_formatted_as_read_and_split_as_the_rows_would_be(monkeypatch, options):
    """The streaming build never holds the rows: a source's Row objects die as they are
    formatted, and the splits, drops and counts equal splitting the rows first and formatting
    each split's rows in order (the list pipeline)."""
    import weakref

    from nanotune.data import builtin
    from nanotune.data.example import Row
    from nanotune.data.formats import TooLong, format_completion
    from nanotune.data.sources import split_rows

    class Probe(Row):  # a Row that can be watched (weakly referenced)
        pass

    alive = most = 0

    def gone() -> None:
        nonlocal alive
        alive -= 1

    def source():
        nonlocal alive, most
        for i in range(300):
            words = "w " * (i % 40)
            row = Probe(
                {"prompt": f"Q{i} " + words, "completion": f" A{i}", "text": words}, f"s:{i}"
            )
            weakref.finalize(row, gone)
            alive += 1
            most = max(most, alive)
            yield row

    monkeypatch.setitem(builtin.BUILTINS, "stream-probe", source)
    cfg = DataConfig(source="builtin:stream-probe", max_length=40, **options)
    tok = gpt2_tokenizer()
    data = build_datasets(cfg, tok)
    assert most <= 3  # the row being formatted and the next one read (never the source)
    fractions = {
        k: cfg_v for k, cfg_v in (("val", cfg.val_fraction), ("test", cfg.test_fraction)) if cfg_v
    }
    for name, split in split_rows(list(source()), fractions, cfg.seed).items():
        split = split[: cfg.limit]
        want, dropped = [], 0
        if cfg.format == "text":
            stream = [t for r in split for t in [*tok.encode(r["text"]), tok.eos_id]]
            blocks = [stream[i : i + 16] for i in range(0, len(stream), 16)]
            want = [Example(b, list(b)) for b in blocks if len(b) >= 2]
        for row in split if cfg.format != "text" else []:
            try:
                want.append(format_completion(row, tok, cfg))
            except TooLong:
                dropped += 1
        assert _same(data.splits[name], want), name
        assert data.stats[name]["rows"] == len(split)
        assert data.stats[name]["dropped_too_long"] == dropped
        assert cfg.format == "text" or dropped > 0


@pytest.mark.slow
def test_a_failing_row_is_counted_in_its_split_and_an_error_names_the_first_in_file_order(
    tmp_path,
):
    rows = [{"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(30)]
    rows[7] = {"prompt": "Q7 " + "w " * 80, "completion": " A7"}  # too long
    rows[21] = {"prompt": "Q21 " + "w " * 80, "completion": " A21"}
    source = _write(tmp_path / "r.jsonl", rows)
    cfg = DataConfig(source=source, val_fraction=0.5, max_length=40)
    data = build_datasets(cfg, gpt2_tokenizer())
    drops = {name: c["dropped_too_long"] for name, c in data.stats.items()}
    assert sum(drops.values()) == 2 and len(data.problems) == 2
    assert data.stats["train"]["examples"] + data.stats["val"]["examples"] == 28
    from nanotune.data.formats import TooLong

    with pytest.raises(TooLong, match=r"r\.jsonl:8: example has"):
        build_datasets(
            DataConfig(source=source, val_fraction=0.5, max_length=40, truncation="error"),
            gpt2_tokenizer(),
        )


def test_cacheable_says_what_cache_key_does(tmp_path):
    from nanotune.data.cache import cache_key, cacheable

    local = _write(tmp_path / "r.jsonl", _chat_rows(3))
    tok = gpt2_tokenizer()
    for cfg in (
        DataConfig(source=local, format="chat"),
        DataConfig(source="builtin:reverse_words"),
        DataConfig(source="someone/some-dataset"),  # a hub id: the hub's cache keeps it
        DataConfig(source=local, format="chat", val_source="someone/other:validation"),
        DataConfig(source=local, format="classification"),
    ):
        assert cacheable(cfg, tok) == (cache_key(cfg, tok) is not None), cfg


@pytest.mark.slow
def test_a_built_split_is_read_from_the_memory_mapped_entry_it_wrote(tmp_path):
    cfg = DataConfig(source=_write(tmp_path / "r.jsonl", _chat_rows(6)), format="chat")
    data = build_datasets(cfg, gpt2_tokenizer())
    assert data.cached is None  # built now
    assert isinstance(data.train.ids, np.memmap)  # not a second copy in the heap


def test_store_take_and_chunked_equal_their_list_forms(monkeypatch, tmp_path):
    from nanotune.data import cache as data_cache

    monkeypatch.setattr("nanotune.data.store.TAKE_BLOCK", 4)  # several blocks per gather
    monkeypatch.setattr("nanotune.data.store.CHUNK", 16)  # labels checked in several chunks
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(30):
        ids = rng.integers(0, 50_000, rng.integers(1, 12)).tolist()
        cut = int(rng.integers(0, len(ids)))
        examples.append(Example(ids, [-100] * cut + ids[cut:]))
    store = ExampleStore.build(examples)
    order = rng.permutation(30)[:17]
    view = store.take(order)
    assert _same(view, [examples[i] for i in order])
    assert np.shares_memory(view.ids, store.ids)  # a view: no token copied
    assert view.lengths.tolist() == [len(examples[i].ids) for i in order]
    assert _same(view.take([3, 0]), [examples[order[3]], examples[order[0]]])
    assert _same(view.compact(), list(view)) and view.compact().order is None
    assert len(store.take(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError):
        store.take([-1])
    # Written to the data cache a block at a time, read back memory-mapped, in its order.
    root = tmp_path / "cache"
    data_cache.save(root, "k", {"train": view}, {"stats": {}, "problems": []})
    back = data_cache.load(root, "k")["splits"]["train"]
    assert _same(back, list(view)) and isinstance(back.ids, np.memmap)
    for block in (2, 5, 7):
        stream = [t for e in examples for t in [*e.ids, 9]]
        want = [stream[i : i + block] for i in range(0, len(stream), block)]
        want = [Example(b, list(b)) for b in want if len(b) >= 2]
        assert _same(store.chunked(9, block), want), block


@pytest.mark.slow
def test_batch_encoding_ahead_gives_the_examples_of_encoding_row_by_row(tmp_path, monkeypatch):
    fmt = "completion"
    from nanotune.data import pipeline
    from nanotune.tokenizer import Tokenizer

    monkeypatch.setenv("NANOTUNE_DATA_CACHE", "off")
    rows = [
        {"prompt": f"Q{i} " + "w " * (i % 45), "completion": f" A{i}", "text": f"T{i} " * i}
        for i in range(60)
    ]
    rows[5] = {"prompt": "no completion"}  # a bad row, skipped and counted
    cfg = DataConfig(
        source=_write(tmp_path / "r.jsonl", rows),
        format=fmt,
        val_fraction=0.2,
        max_length=40,
        chunk_tokens=24,
        on_bad_row="skip",
    )
    one_by_one = build_datasets(cfg, gpt2_tokenizer())  # tiktoken: batch_is_faster is False
    batches = []
    encode_batch = Tokenizer.encode_batch

    def counted(self, texts, allow_special=True):
        batches.append(len(texts))
        return encode_batch(self, texts, allow_special)

    monkeypatch.setattr(Tokenizer, "batch_is_faster", property(lambda self: True))
    monkeypatch.setattr(Tokenizer, "encode_batch", counted)
    monkeypatch.setattr(pipeline, "ENCODE_BLOCK", 7)
    ahead = build_datasets(cfg, gpt2_tokenizer())
    assert len(batches) >= 60 // 7 and max(batches) <= 14  # a block's texts per call
    assert ahead.stats == one_by_one.stats and ahead.problems == one_by_one.problems
    for name in one_by_one.splits:
        assert _same(ahead.splits[name], one_by_one.splits[name]), name
    assert sum(c["skipped_bad_row"] for c in one_by_one.stats.values()) == 1
    assert sum(c["dropped_too_long"] for c in one_by_one.stats.values()) > 0


def _loss(model, examples) -> float:
    from nanotune.eval.evaluate import perplexity

    batches = epoch_batches(examples, 4, 0, 0, pad_id=0, shuffle=False)
    return perplexity(model, batches)["loss"]


@pytest.mark.slow
def test_token_ids_edited_in_the_entry_are_rebuilt_not_trained_on(tmp_path, capsys, tiny_gpt2_dir):
    from nanotune.data import cache as data_cache
    from nanotune.weights import load_model

    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(12)]
    cfg = DataConfig(source=_write(tmp_path / "r.jsonl", rows), val_fraction=0.0)
    fresh = list(build_datasets(cfg, gpt2_tokenizer()).train)  # read now: it maps the entry
    entry = build_datasets(cfg, gpt2_tokenizer()).cached
    ids = np.load(entry / "train.ids.npy", mmap_mode="r+")  # the same size, other tokens
    ids[:] = (ids + 1) % 50_000
    ids.flush()
    del ids
    edited = data_cache.load(entry.parent, entry.name, verify=False)["splits"]["train"]
    capsys.readouterr()

    rebuilt = build_datasets(cfg, gpt2_tokenizer())
    assert rebuilt.cached is None and _same(rebuilt.train, fresh)
    note = capsys.readouterr().out.strip()
    assert note == (
        f"note: data cache entry {entry} is damaged (train.ids.npy differs from the file "
        "written); building it anew"
    )
    model, _ = load_model(str(tiny_gpt2_dir))
    assert _loss(model, rebuilt.train) == _loss(model, fresh)
    assert _loss(model, edited) != _loss(model, fresh)  # what it trained on before
    assert build_datasets(cfg, gpt2_tokenizer()).cached == entry  # written anew, read again


@pytest.mark.parametrize(
    "damage",
    ["chat-template", "added-token", "empty-ids", "empty-offsets", "no-checksums"],
)
@pytest.mark.slow
def test_a_damaged_entry_is_built_anew_with_a_note(tmp_path, capsys, damage):
    cfg = DataConfig(
        source=_write(tmp_path / "chat.jsonl", _chat_rows(10)),
        format="chat",
        chat_style="markers",
        val_fraction=0.2,
    )
    made = gpt2_tokenizer()
    fresh = {name: list(split) for name, split in build_datasets(cfg, made).splits.items()}
    entry = build_datasets(cfg, gpt2_tokenizer()).cached
    meta = json.loads((entry / "meta.json").read_text())
    if damage == "chat-template":  # would ship in final/ with the run's tokenizer
        meta["chat_template"] = "{{ 'pwned' }}"
    elif damage == "added-token":
        meta["added_tokens"].append("<|pwned|>")
    (entry / "meta.json").write_text(json.dumps(meta))
    if damage == "empty-ids":  # was an EOFError on every run, --dry-run too, until deleted
        (entry / "train.ids.npy").write_bytes(b"")
    elif damage == "empty-offsets":
        (entry / "val.offsets.npy").write_bytes(b"")
    elif damage == "no-checksums":
        (entry / "checksums.json").unlink()
    capsys.readouterr()

    tok = gpt2_tokenizer()
    again = build_datasets(cfg, tok)
    out = capsys.readouterr().out
    assert again.cached is None, damage
    assert out.startswith(f"note: data cache entry {entry} is damaged (") and out.count("\n") == 1
    assert again.splits.keys() == fresh.keys()
    for name in fresh:
        assert _same(again.splits[name], fresh[name])
    assert tok.chat_template == made.chat_template and "pwned" not in tok.chat_template
    assert tok.special_tokens == made.special_tokens
    assert build_datasets(cfg, gpt2_tokenizer()).cached == entry


@pytest.mark.slow
def test_an_emptied_entry_costs_a_dry_run_a_note_not_a_traceback(
    tmp_path, capsys, monkeypatch, tiny_gpt2_dir
):
    import yaml

    from nanotune.cli import main

    monkeypatch.setenv("NANOTUNE_DATA_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"say {w}", "completion": f" {w}"} for w in ["cat", "dog", "sun", "sea"]]
    cfg = {
        "model": str(tiny_gpt2_dir),
        "data": {"source": _write(tmp_path / "d.jsonl", rows), "max_length": 32},
        "train": {"max_steps": 1, "micro_batch_size": 2, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "train.ids.npy").write_bytes(b"")
    capsys.readouterr()
    assert main(["train", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"note: data cache entry {entry} is damaged (train.ids.npy differs" in out
    assert main(["train", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    assert "damaged" not in capsys.readouterr().out  # built anew, trusted again

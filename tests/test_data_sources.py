"""Sources, splits and bad data: every problem names its file and line, or is a counted skip."""

from __future__ import annotations

import json
import shlex
from collections import Counter

import pytest

from nanotune.config import RunConfig
from nanotune.data import DataConfig, build_datasets, iter_source
from nanotune.data.builtin import WORDS
from nanotune.errors import NanotuneError
from nanotune.recipes import load_recipe, recipe_text
from nanotune.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def qa(i: int) -> dict:
    return {"prompt": f"question {i}", "completion": f"answer {i}"}


def test_all_file_formats_give_the_same_rows(tmp_path, tok):
    rows = [{"text": "hello, world", "label": "a"}, {"text": "tab\there", "label": "b"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text('text,label\n"hello, world",a\n"tab\there",b\n')
    (tmp_path / "d.tsv").write_text('text\tlabel\nhello, world\ta\n"tab\there"\tb\n')
    (tmp_path / "d-bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "d.csv").read_bytes())
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d-bom.csv", "d.parquet"):
        got = list(iter_source(str(tmp_path / name)))
        assert [dict(r) for r in got] == rows, name
    # A tab inside a tsv field needs quoting, which tsv files are read without unless asked.
    assert [dict(r) for r in iter_source(str(tmp_path / "d.tsv"), quoting="csv")] == rows
    with pytest.raises(NanotuneError, match=r"d\.tsv:3: 3 fields but the header has 2"):
        build_datasets(DataConfig(source=str(tmp_path / "d.tsv"), format="text"), tok)
    assert [r.where for r in iter_source(str(tmp_path / "d.jsonl"))] == [
        f"{tmp_path / 'd.jsonl'}:1",
        f"{tmp_path / 'd.jsonl'}:2",
    ]
    assert list(iter_source(str(tmp_path / "d.csv")))[1].where == f"{tmp_path / 'd.csv'}:3"
    # A .json list names each item by the line it starts on.
    assert [r.where for r in iter_source(str(tmp_path / "d.json"))] == [
        f"{tmp_path / 'd.json'}:2",
        f"{tmp_path / 'd.json'}:6",
    ]


def sms_collection(path, n=40):
    """The UCI SMS Spam Collection's layout: "label<TAB>message" per line, no header, no
    extension, quotes as plain text; message 3 opens a quote it never closes."""
    lines = []
    for i in range(n):
        label = "spam" if i % 4 == 1 else "ham"
        text = f'WIN a "free" prize {i}, txt NOW' if label == "spam" else f"see you at {i}, ok?"
        if i == 3:
            text = '"Ok lar... Joking wif u oni...'
        lines.append((label, text))
    path.write_text("".join(f"{label}\t{text}\n" for label, text in lines))
    return lines


def test_sms_spam_collection_every_line_one_row_with_its_label(tmp_path, tok):
    path = tmp_path / "SMSSpamCollection"
    lines = sms_collection(path)
    cfg = dict(source=str(path), format="classification", label_names=["ham", "spam"])
    with pytest.raises(
        NanotuneError, match=r"SMSSpamCollection: no extension; set data.file_format"
    ):
        build_datasets(DataConfig(**cfg), tok)
    cfg.update(file_format="tsv", header=False, columns={"label": 1, "text": 2})
    data = build_datasets(DataConfig(**cfg), tok)
    assert data.stats["train"]["rows"] == len(lines) == len(data.train)
    assert [e.label for e in data.train] == [["ham", "spam"].index(label) for label, _ in lines]
    assert [tok.decode(e.ids) for e in data.train] == [text for _, text in lines]
    # Quoting it anyway stops at the unclosed quote instead of merging the lines after it.
    with pytest.raises(NanotuneError, match=r"SMSSpamCollection:4: a '\"' .* does not close"):
        build_datasets(DataConfig(**cfg, quoting="csv"), tok)
    # Read as comma-separated, the tabs are named with the fix.
    with pytest.raises(NanotuneError, match=r"SMSSpamCollection:4: 1 fields .*file_format: tsv"):
        build_datasets(DataConfig(**{**cfg, "file_format": "csv"}), tok)
    path.write_text("label\ttext\n" + path.read_text())
    with pytest.raises(NanotuneError, match=r"SMSSpamCollection:1: the header has tabs.*: tsv"):
        build_datasets(DataConfig(**{**cfg, "file_format": "csv", "header": True}), tok)


def test_spam_recipe_reads_the_shipped_file_with_its_documented_overrides(
    tmp_path, tok, monkeypatch
):
    command = "nanotune train spam-classify data.source=./SMSSpamCollection"
    (line,) = [line for line in recipe_text("spam-classify").splitlines() if command in line]
    overrides = [a for a in shlex.split(line.lstrip("# ")) if a.startswith("data.")]
    monkeypatch.chdir(tmp_path)
    lines = sms_collection(tmp_path / "SMSSpamCollection", n=80)
    data = build_datasets(load_recipe("spam-classify", overrides).data, tok)
    n_spam = sum(label == "spam" for label, _ in lines)
    counts = Counter(e.label for split in data.splits.values() for e in split)
    assert counts == {0: n_spam, 1: n_spam}  # balanced: ham down-sampled to the spam count


def test_a_field_spanning_lines_is_an_error_unless_multiline(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\nq1,"one line"\nq2,"two\nlines"\nq3,a3\n')
    with pytest.raises(
        NanotuneError,
        match=r"d\.csv:3: a quoted field starting on this line runs to line 4.*quoting: multiline",
    ):
        build_datasets(DataConfig(source=str(path)), tok)
    rows = list(iter_source(str(path), quoting="multiline"))
    assert [r["completion"] for r in rows] == ["one line", "two\nlines", "a3"]
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "3", "5"]
    # Quotes as plain text: every line is a row, and the cut one is a bad row naming its line.
    with pytest.raises(NanotuneError, match=r"d\.csv:4: 1 fields but the header has 2"):
        build_datasets(DataConfig(source=str(path), quoting="none"), tok)


def test_folder_skips_hidden_files_and_file_format_reads_any_name(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(qa(0)) + "\n")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text(json.dumps(qa(9)) + "\n")
    (tmp_path / "part-0001").write_text(json.dumps(qa(1)) + "\n")
    assert [r["prompt"] for r in iter_source(str(tmp_path))] == ["question 0"]
    got = iter_source(str(tmp_path), file_format="jsonl")
    assert [r["prompt"] for r in got] == ["question 0", "question 1"]


def bad_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([qa(i) for i in range(50)]), tmp_path / "whole.parquet")
    whole = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "fake.parquet").write_text("prompt,completion\nq,a\n")
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut.json").write_text('[{"prompt": "q", "completion": "a"},\n {"prompt": ')
    (tmp_path / "img.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "wide.txt").write_text("hello\nworld\n", encoding="utf-16")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / "data.v2").write_text("x")


@pytest.mark.parametrize(
    "name, message",
    [
        ("fake.parquet", r"fake\.parquet: not a readable Parquet file"),
        ("cut.parquet", r"cut\.parquet: not a readable Parquet file"),
        ("cut.json", r"cut\.json:2: malformed JSON"),
        ("img.csv", r"img\.csv:3: binary data \(a NUL byte\), not csv text"),
        ("wide.txt", r"wide\.txt: UTF-16 text; re-encode it as UTF-8"),
        ("zero.jsonl", r"zero\.jsonl: the file is empty"),
        ("docs", r"docs: folder has no data files .*data\.file_format"),
        ("data.v2", r"data\.v2: unknown extension '\.v2'; set data\.file_format"),
    ],
)
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, tok, name, message):
    bad_files(tmp_path)
    with pytest.raises(NanotuneError, match=message) as e:
        build_datasets(DataConfig(source=str(tmp_path / name), on_bad_row="skip"), tok)
    assert "\n" not in str(e.value)


def test_bad_lines_name_file_and_line(tmp_path, tok):
    (tmp_path / "t.txt").write_bytes(b"fine\n\npara one\ncaf\xe9 two\n")
    for unit in ("file", "paragraph", "line"):
        with pytest.raises(NanotuneError, match=r"t\.txt:4: not valid UTF-8"):
            build_datasets(
                DataConfig(source=str(tmp_path / "t.txt"), format="text", text_unit=unit), tok
            )
    (tmp_path / "l.json").write_text(
        '[\n  {"prompt": "q", "completion": "a"},\n  ["not", "a row"]\n]'
    )
    with pytest.raises(NanotuneError, match=r"l\.json:3: expected an object, got list"):
        build_datasets(DataConfig(source=str(tmp_path / "l.json")), tok)
    (tmp_path / "d.csv").write_text("prompt,completion\nq1,a1\nq2,a2,extra\n")
    with pytest.raises(NanotuneError, match=r"d\.csv:3: 3 fields but the header has 2; quote"):
        build_datasets(DataConfig(source=str(tmp_path / "d.csv")), tok)
    (tmp_path / "dup.csv").write_text("text,text\na,b\n")
    with pytest.raises(NanotuneError, match=r"dup\.csv:1: the header names column\(s\) 'text'"):
        build_datasets(DataConfig(source=str(tmp_path / "dup.csv")), tok)


def test_text_units(tmp_path):
    (tmp_path / "t.txt").write_text("para one\nline two\n\npara two\n")
    assert [r["text"] for r in iter_source(str(tmp_path / "t.txt"), "paragraph")] == [
        "para one\nline two",
        "para two",
    ]
    assert [r.where.split(":")[-1] for r in iter_source(str(tmp_path / "t.txt"), "line")] == [
        "1",
        "2",
        "4",
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ([qa(0), "{not json", qa(2)], r"d\.jsonl:2: malformed JSON"),
        ([qa(0), {"prompt": "no answer"}], r"d\.jsonl:2: missing column 'completion'"),
        (
            [qa(0), qa(1), b'{"prompt": "caf\xe9", "completion": "x"}'],
            r"d\.jsonl:3: not valid UTF-8",
        ),
    ],
)
def test_bad_rows_error_or_counted_skip(tmp_path, tok, content, message):
    path = tmp_path / "d.jsonl"
    data = b"\n".join(
        c if isinstance(c, bytes) else (c if isinstance(c, str) else json.dumps(c)).encode()
        for c in content
    )
    path.write_bytes(data)
    with pytest.raises(NanotuneError, match=message):
        build_datasets(DataConfig(source=str(path)), tok)
    data = build_datasets(DataConfig(source=str(path), on_bad_row="skip"), tok)
    assert data.stats["train"]["skipped_bad_row"] == 1
    assert len(data.train) == len(content) - 1
    assert "1 skipped bad row" in data.summary()


def test_column_mapping_and_missing_mapped_column(tmp_path, tok):
    path = write_jsonl(tmp_path / "q.jsonl", [{"quote": "q1", "tags": ["a", "b"]}, {"quote": "q2"}])
    cfg = dict(source=str(path), columns={"prompt": "quote", "completion": "tags"})
    with pytest.raises(
        NanotuneError, match=r"q\.jsonl:2: missing column 'tags' \(data.columns.completion\)"
    ):
        build_datasets(DataConfig(**cfg), tok)
    data = build_datasets(DataConfig(**cfg, on_bad_row="skip"), tok)
    assert tok.decode(data.train[0].ids) == "q1a, b<|endoftext|>"


def test_classification_label_outside_set_names_file_and_row(tmp_path, tok):
    train = tmp_path / "train.csv"
    train.write_text("sms,category\nwin cash now,spam\nsee you at six,ham\n")
    val = tmp_path / "val.csv"
    val.write_text("sms,category\ncall me,ham\nfree prize,eggs\n")
    cfg = dict(
        source=str(train),
        val_source=str(val),
        format="classification",
        columns={"text": "sms", "label": "category"},
    )
    with pytest.raises(NanotuneError, match=r"val\.csv:3: label 'eggs' is not one of ham, spam"):
        build_datasets(DataConfig(**cfg), tok)
    data = build_datasets(DataConfig(**cfg, on_bad_row="skip"), tok)
    assert data.label_names == ["ham", "spam"]
    assert [e.label for e in data.train] == [1, 0] and [e.label for e in data.val] == [0]


def test_empty_split_and_missing_source_are_errors(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(NanotuneError, match="empty.jsonl: the train split is empty"):
        build_datasets(DataConfig(source=str(empty)), tok)
    good = write_jsonl(tmp_path / "g.jsonl", [qa(0)])
    with pytest.raises(NanotuneError, match="empty.jsonl: the val split is empty"):
        build_datasets(DataConfig(source=str(good), val_source=str(empty)), tok)
    with pytest.raises(NanotuneError, match="nope.jsonl: no such file"):
        build_datasets(DataConfig(source=str(tmp_path / "nope.jsonl")), tok)
    # Everything skipped is not a dataset either.
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{x", "{y"])
    with pytest.raises(NanotuneError, match="train split is empty"):
        build_datasets(DataConfig(source=str(bad), on_bad_row="skip"), tok)


def test_config_validation_names_the_field():
    with pytest.raises(NanotuneError, match="data.format: 'poem'"):
        DataConfig(source="x", format="poem")
    with pytest.raises(NanotuneError, match="data.val_fraction"):
        DataConfig(source="x", val_fraction=1.5)
    with pytest.raises(NanotuneError, match="data.max_len: unknown key; did you mean 'max_length'"):
        RunConfig.from_dict({"data": {"source": "x", "max_len": 5}})
    with pytest.raises(NanotuneError, match="data.source"):
        DataConfig()
    with pytest.raises(NanotuneError, match=r"data.file_format: 'tvs' .*did you mean 'tsv'"):
        DataConfig(source="x", file_format="tvs")
    with pytest.raises(NanotuneError, match=r"data.file_format: 'tvs' .*did you mean 'tsv'"):
        RunConfig.from_dict({"data": {"source": "x", "file_format": "tvs"}})
    with pytest.raises(NanotuneError, match=r"data.quoting: 'multi' .*did you mean 'multiline'"):
        RunConfig.from_dict({"data": {"source": "x", "quoting": "multi"}})
    with pytest.raises(NanotuneError, match="data.header: applies to csv/tsv files"):
        DataConfig(source="x", file_format="jsonl", header=False)
    with pytest.raises(NanotuneError, match="data.columns: .*positions count from 1"):
        DataConfig(source="x", header=False, columns={"label": 0, "text": 1})
    cfg = RunConfig.from_dict({"data": {"source": "x", "header": False, "columns": {"text": 2}}})
    assert cfg.data.columns == {"text": "2"}


def test_fraction_splits_are_seeded_disjoint_and_limited(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(i) for i in range(100)])
    cfg = dict(source=str(path), val_fraction=0.1, test_fraction=0.2)

    def prompts(d, split):
        return sorted(tok.decode(e.ids).split(" answer")[0] for e in d.splits[split])

    a = build_datasets(DataConfig(**cfg, seed=1), tok)
    b = build_datasets(DataConfig(**cfg, seed=1), tok)
    c = build_datasets(DataConfig(**cfg, seed=2), tok)
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert all(prompts(a, s) == prompts(b, s) for s in ("train", "val", "test"))
    assert prompts(a, "val") != prompts(c, "val")
    assert len(set().union(*(prompts(a, s) for s in ("train", "val", "test")))) == 100
    limited = build_datasets(DataConfig(**cfg, seed=1, limit=5), tok)
    assert [len(limited.splits[s]) for s in ("train", "val", "test")] == [5, 5, 5]


def test_stratified_split_and_balancing(tmp_path, tok):
    rows = [{"text": f"msg {i}", "label": "spam" if i % 5 == 0 else "ham"} for i in range(200)]
    path = write_jsonl(tmp_path / "sms.jsonl", rows)
    cfg = dict(source=str(path), format="classification", val_fraction=0.2)
    strat = build_datasets(DataConfig(**cfg), tok)
    assert Counter(e.label for e in strat.val) == {0: 32, 1: 8}  # ham, spam keep 4:1
    bal = build_datasets(DataConfig(**cfg, balance=True), tok)
    assert Counter(e.label for e in bal.train) == {0: 32, 1: 32}
    assert Counter(e.label for e in bal.val) == {0: 8, 1: 8}


def test_builtin_sources(tok):
    rows = list(iter_source("builtin:reverse_words"))
    assert len(rows) == 2000 and rows == list(iter_source("builtin:reverse_words"))
    r = rows[0]
    words = r["input"].split()
    assert r["completion"].split() == words[::-1] and set(words) <= set(WORDS)
    data = build_datasets(
        DataConfig(source="builtin:reverse_words", val_fraction=0.1, limit=50), tok
    )
    assert len(data.train) == 50 and len(data.val) == 50
    order = Counter(r["label"] for r in iter_source("builtin:word_order"))
    assert order == {"sorted": 1000, "shuffled": 1000}
    chat = list(iter_source("builtin:chatterbot"))
    assert len(chat) > 1000
    assert all(
        m["role"] == ("user" if i % 2 == 0 else "assistant")
        for r in chat
        for i, m in enumerate(r["messages"])
    )
    assert chat[0].where.startswith("chatterbot:ai.yml: conversation 0")
    with pytest.raises(NanotuneError, match="builtin:nope: no such builtin"):
        iter_source("builtin:nope")


def test_hf_save_to_disk_folder(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([qa(i) for i in range(6)]),
            "validation": datasets.Dataset.from_list([qa(i) for i in range(6, 8)]),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    data = build_datasets(
        DataConfig(source=str(tmp_path / "ds"), val_source=f"{tmp_path / 'ds'}:validation"), tok
    )
    assert len(data.train) == 6 and len(data.val) == 2
    with pytest.raises(NanotuneError, match="no split 'test'"):
        build_datasets(DataConfig(source=f"{tmp_path / 'ds'}:test"), tok)


def test_hf_hub_id_offline_fails_fast_with_advice(tok, monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        NanotuneError,
        match=r"hf:nobody/no-such-set:train: cannot load .*point data.source at local",
    ):
        build_datasets(DataConfig(source="hf:nobody/no-such-set"), tok)


def test_jsonl_is_read_line_by_line_and_a_line_may_hold_u2028(tmp_path):
    # str.splitlines would cut this row at U+2028, which JSON allows raw inside a string.
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode() + b'\r\n{"text": "c"}\n'
    )
    got = list(iter_source(str(path)))
    assert [dict(r) for r in got] == [{"text": "a\u2028b"}, {"text": "c"}]
    assert [r.where for r in got] == [f"{path}:1", f"{path}:2"]

"""`nanotune demo`: the demo recipe's code path end to end on a tiny random Llama (SmolLM2's
architecture and tokenizer), a handful of steps."""

from __future__ import annotations

import base64
import json
import re

import pytest

from nanotune.cli import main
from nanotune.errors import NanotuneError
from nanotune.jobs.demo import format_samples, last_user_text, run_demo

SIZES = ["train.max_steps=4", "train.eval_every=2", "eval.max_examples=8", "eval.max_new_tokens=8"]


def test_demo_writes_report_with_table_curves_and_samples(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "demo"
    result = run_demo(out, overrides=[f"model={tiny_llama_dir}", *SIZES], progress=False)
    printed = capsys.readouterr().out
    assert result.run_dir == out and result.report == out / "report.html"
    assert (out / "final" / "adapter_config.json").is_file()
    # The before/after table, sample generations and the report's path are printed.
    assert re.search(r"exact_match\s+\d\.\d{4}\s+\d\.\d{4}", printed)
    assert "input      Reverse the words:" in printed
    assert f"report: {out / 'report.html'}" in printed

    page = result.report.read_text()
    assert "<th>before</th><th>after</th>" in page and "exact_match" in page
    images = re.findall(r'alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {alt for alt, _ in images} == {
        "training and evaluation loss",
        "learning rate",
        "eval_ppl curve",
    }
    for _, data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "Reverse the words:" in page  # samples
    # The run's own figures, from metrics.jsonl and the data counts.
    assert "trainable parameters" in page and "tokens/s" in page and "examples</th>" in page

    results = json.loads((out / "eval.json").read_text())
    assert results["split"] == "test" and set(results["before"]) == {"exact_match"}
    assert len(result.samples) == 4 and all("after" in s for s in result.samples)


def test_demo_cli_refuses_an_existing_run_dir(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["demo", f"model={tiny_llama_dir}", *SIZES, "--output-dir", str(out)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite never deletes what nanotune did not write
    assert main([*args, "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # ... but replaces its own run
    mine = [*args[:-1], str(tmp_path / "mine")]
    assert main(mine) == 0
    (tmp_path / "mine" / "report.html").write_text("old")
    assert main([*mine, "--overwrite"]) == 0
    assert (tmp_path / "mine" / "report.html").read_text() != "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "mine"]


def test_sample_rendering_shows_the_user_turn_not_the_template():
    prompt = (
        "<|im_start|>system\nReply with the words only.<|im_end|>\n"
        "<|im_start|>user\nReverse the words: a b c<|im_end|>\n<|im_start|>assistant\n"
    )
    assert last_user_text(prompt) == "Reverse the words: a b c"
    text = format_samples(
        [{"prompt": prompt, "reference": "c b a", "before": "x", "after": "c b a"}]
    )
    assert text.splitlines()[0] == "  input      Reverse the words: a b c"


def test_demo_unknown_override_is_a_clear_error(tmp_path):
    with pytest.raises(NanotuneError, match="train.lerning_rate: unknown key"):
        run_demo(tmp_path / "d", overrides=["train.lerning_rate=1"])
    assert not (tmp_path / "d").exists()

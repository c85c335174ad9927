"""The GPU check's CPU-side logic: its table from a pytest report, the break-even arithmetic,
and a whole run on a machine without CUDA (every part skipped with the reason, exit 0)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanotune.bench import gpu_check

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_precision" name="test_a" time="1.0"/>
<testcase classname="tests.test_precision" name="test_b" time="1.0">
  <skipped type="pytest.skip" message="CUDA only: run with --device cuda">why</skipped>
</testcase>
<testcase classname="tests.test_compiled" name="test_c[gpt2-full]" time="1.0">
  <failure message="assert 1 == 2">trace</failure>
</testcase>
<testcase classname="tests.test_compiled" name="test_d" time="1.0"/>
</testsuite></testsuites>"""


def test_junit_report_becomes_one_row_per_file():
    rows = gpu_check.junit_rows(JUNIT)
    assert [(r.what, r.result) for r in rows] == [
        ("test_compiled.py", "FAILED"),
        ("test_precision.py", "ok"),
    ]
    assert rows[0].detail == "1 passed, 1 failed; failed: test_c[gpt2-full]"
    assert rows[1].detail == "1 passed, 1 skipped; skipped: CUDA only: run with --device cuda"


def test_break_even_and_steady_throughput(tmp_path):
    # 100 s of compile, steps 25% shorter compiled: paid back after 400 s of eager steps.
    assert gpu_check.break_even_s(300.0, 400.0, 100.0) == pytest.approx(400.0)
    assert math.isinf(gpu_check.break_even_s(400.0, 390.0, 10.0))
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "tokens": 100, "tokens_per_s": 1.0},  # the compile step: left out
        {"step": 2, "tokens": 100, "tokens_per_s": 100.0},
        {"step": 2, "eval_loss": 1.0},
        {"step": 3, "tokens": 300, "tokens_per_s": 100.0},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gpu_check._steady(metrics, skip=1) == pytest.approx(100.0)


def test_device_tests_are_found():
    names = {p.name for p in gpu_check.device_test_files()}
    assert {"test_precision.py", "test_compiled.py"} <= names


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check runs it")
def test_without_cuda_every_part_is_skipped_with_the_reason(capsys):
    assert gpu_check.main(["--device", "cuda"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("nanotune GPU check on cuda (absent)")
    body = [ln for ln in lines[3:] if ln.strip()]
    assert {ln.split()[0] for ln in body} == {"tests", "compile", "bench"}
    assert all(" skipped " in ln and " ok " not in ln for ln in body), out
    assert all("no CUDA device on this machine" in ln for ln in body), out
    assert any(ln.split()[1] == "test_compiled.py" for ln in body)


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--parts", "tests,speed"])

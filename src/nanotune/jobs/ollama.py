"""Ollama's Modelfile for an exported GGUF: FROM the file beside it, the chat template as a Go
template, the stop tokens, and `nanotune generate`'s sampling defaults, so that `ollama create`
gives a model that answers as nanotune does.

Ollama templates are Go templates over `.Messages`, not Jinja, and no general translation exists.
So a chat template is translated only when it provably renders one known layout: the Jinja is
rendered on probe conversations and compared with ChatML (SmolLM2, Qwen, many fine-tunes), a
default system prompt it adds when none is given becoming Ollama's SYSTEM. Any other template is
left out with a note saying so: Ollama then picks a template from the GGUF's
tokenizer.chat_template by itself, or one writes TEMPLATE by hand.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_write, check_file_target
from nanotune.generate import GenerationConfig, default_stop_ids
from nanotune.models.config import ModelConfig
from nanotune.tokenizer import Tokenizer

MODELFILE = "Modelfile"
HEADER = "# Written by `nanotune export --ollama`"
"""A Modelfile's first line: `--overwrite` replaces only a Modelfile that starts with it."""

# ChatML over Ollama's messages (system messages included: Ollama puts SYSTEM first when a
# request has none), then the reply's header, as add_generation_prompt renders it.
CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

# Contents no template rewrites (no spaces to trim, no markup), to find them in its output.
_PROBES = [
    ("system", "probe-system-3f1"),
    ("user", "probe-user-3f1"),
    ("assistant", "probe-assistant-3f1"),
    ("user", "probe-again-3f1"),
]
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", re.DOTALL)


@dataclass(frozen=True)
class Translation:
    """A chat template as Ollama takes it: TEMPLATE, SYSTEM (None: none), extra stop strings;
    `template` None when it could not be translated, with `note` saying why."""

    template: str | None
    system: str | None = None
    stops: tuple[str, ...] = ()
    note: str | None = None


def _chatml(messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def translate_chat_template(tokenizer: Tokenizer) -> Translation:
    """The tokenizer's chat template as an Ollama TEMPLATE (and SYSTEM), when it is ChatML."""
    where = tokenizer.name
    if not tokenizer.chat_template:
        return Translation(None, note=f"{where} has no chat template, so the Modelfile has none")
    fallback = (
        f"the chat template of {where} is not ChatML, the one layout nanotune translates to "
        "Ollama's Go templates; the Modelfile has no TEMPLATE, so Ollama picks one from the "
        "GGUF's tokenizer.chat_template (check it with `ollama show --template`) or add your own"
    )
    convo = [{"role": role, "content": text} for role, text in _PROBES]
    alone = convo[1:2]
    try:
        full = tokenizer.apply_chat_template(convo, True)
        single = tokenizer.apply_chat_template(alone, True)
    except NanotuneError:  # e.g. a template that refuses system messages
        return Translation(None, note=fallback)
    if full != _chatml(convo, True) or not single.endswith(_chatml(alone, True)):
        return Translation(None, note=fallback)
    added = single[: -len(_chatml(alone, True))]
    default = _CHATML_SYSTEM.fullmatch(added)
    if added and default is None:
        return Translation(None, note=fallback)
    system = default.group(1) if default else None
    if system is not None and '"""' in system:
        return Translation(None, note=f'{fallback} (its default system prompt holds \'"""\')')
    return Translation(CHATML_GO, system, stops=("<|im_start|>",))


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(
    gguf_file: str, tokenizer: Tokenizer, config: ModelConfig
) -> tuple[str, str | None]:
    """(Modelfile text for the GGUF file named `gguf_file` beside it, a note when the chat
    template could not be translated)."""
    translation = translate_chat_template(tokenizer)
    sampling = GenerationConfig()
    lines = [
        f"{HEADER}; in this folder: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_file}",
    ]
    if translation.template is not None:
        lines.append(f'TEMPLATE """{translation.template}"""')
    if translation.system is not None:
        lines.append(f'SYSTEM """{translation.system}"""')
    stops = [tokenizer.decode([i]) for i in default_stop_ids(tokenizer)]
    for stop in dict.fromkeys([*stops, *translation.stops]):  # in order, once each
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    lines += [
        "# nanotune generate's defaults (greedy); change them freely",
        f"PARAMETER temperature {sampling.temperature:g}",
        f"PARAMETER top_k {sampling.top_k}",
        f"PARAMETER top_p {sampling.top_p:g}",
        f"PARAMETER repeat_penalty {sampling.repetition_penalty:g}",
        f"PARAMETER num_ctx {config.block_size}",
    ]
    return "\n".join(lines) + "\n", translation.note


def modelfile_path(gguf: str | os.PathLike) -> Path:
    """Where the Modelfile of the GGUF file `gguf` goes: beside it."""
    return Path(gguf).expanduser().parent / MODELFILE


def check_modelfile_target(gguf: str | os.PathLike, *, overwrite: bool) -> Path:
    """The Modelfile path of `gguf`, refused (one line) if it exists and not `overwrite`."""
    path = modelfile_path(gguf)
    check_file_target(path, overwrite=overwrite, ours=_ours, what="output folder")
    return path


def _ours(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(HEADER)) == HEADER.encode()


def write_modelfile(
    gguf: str | os.PathLike, tokenizer: Tokenizer, config: ModelConfig, *, overwrite: bool
) -> tuple[Path, str | None]:
    """Write the Modelfile beside the GGUF file `gguf`, atomically; (its path, the note of an
    untranslated chat template or None)."""
    path = check_modelfile_target(gguf, overwrite=overwrite)
    text, note = modelfile_text(Path(gguf).name, tokenizer, config)
    atomic_write(path, text)
    return path, note

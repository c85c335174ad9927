"""`nanotune generate` and `nanotune chat`: a model (and adapter) loaded for decoding, answering
one prompt or a conversation in the terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable

from nanotune.errors import NanotuneError
from nanotune.generate import chat_prompt, generate, stream
from nanotune.jobs import artifacts
from nanotune.jobs.config import ChatCommand, GenerateCommand


def generate_command(c: GenerateCommand) -> int:
    """Print the continuation of --prompt, or the reply to --chat."""
    model, tokenizer = artifacts.load(c.model, c.adapter, c.dtype, c.sampling.compile)
    text = c.prompt
    if c.chat is not None:
        system = [{"role": "system", "content": c.system}] if c.system else []
        text = chat_prompt(tokenizer, [*system, {"role": "user", "content": c.chat}])
    if c.stream:
        for piece in stream(model, tokenizer, text, c.sampling):
            print(piece, end="", flush=True)
        print()
    else:
        print(generate(model, tokenizer, [text], c.sampling)[0])
    return 0


def chat_command(c: ChatCommand, read: Callable[[str], str] | None = None) -> int:
    """A conversation on the terminal: /reset clears the history, /exit (or end of input)
    quits; the oldest exchanges are forgotten rather than overflow the context."""
    read = read or input  # looked up now: tests replace builtins.input
    model, tokenizer = artifacts.load(c.model, c.adapter, c.dtype, c.sampling.compile)
    chat_prompt(tokenizer, [{"role": "user", "content": ""}])  # fail now if it has no template
    system = [{"role": "system", "content": c.system}] if c.system else []
    room = model.config.block_size - c.sampling.max_new_tokens
    history: list[dict[str, str]] = []
    print(
        f"nanotune chat with {c.model or c.adapter or 'the default model'}: /reset clears "
        "the history, /exit quits",
        file=sys.stderr,
    )
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = chat_prompt(tokenizer, system + history)
        while len(tokenizer.encode(prompt)) > room and len(history) > 1:
            history = history[2:]
            prompt = chat_prompt(tokenizer, system + history)
        reply = []
        try:
            for piece in stream(model, tokenizer, prompt, c.sampling):
                print(piece, end="", flush=True)
                reply.append(piece)
        except NanotuneError as e:
            print(f"nanotune: error: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})

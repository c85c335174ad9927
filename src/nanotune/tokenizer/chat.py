"""Chat templates: jinja in the sandbox transformers uses, with its `{% generation %}` tag.

A template marks what the assistant writes with `{% generation %}` … `{% endgeneration %}`
(transformers' `AssistantTracker`); rendering with `spans=True` returns the character span of
each such block in the output, which `return_assistant_tokens_mask` turns into token labels.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanotune.errors import NanotuneError

Spans = list[tuple[int, int]]  # (start, end) character positions in the rendered text

# transformers' own test for the tag (`return_assistant_tokens_mask` refuses templates without it).
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


def has_generation_blocks(template: str | None) -> bool:
    """Whether the template marks assistant text with `{% generation %}` blocks."""
    return bool(template) and _GENERATION_TAG.search(template) is not None


class _GenerationTracker(Extension):
    """`{% generation %}…{% endgeneration %}` renders its body unchanged; while a render tracks,
    it records where the body lands in the output (as transformers' AssistantTracker does)."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        # Per render, not per template: compiled templates are cached and shared across threads.
        self.tracking: ContextVar[tuple[list[str], Spans] | None] = ContextVar(
            "nanotune_generation", default=None
        )

    def parse(self, parser) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    def _generation(self, caller) -> str:
        text = caller()
        tracked = self.tracking.get()
        if tracked is not None:
            blocks, spans = tracked
            start = sum(len(b) for b in blocks)  # the output so far: the block starts here
            spans.append((start, start + len(text)))
        return text


@lru_cache(maxsize=16)
def _compile(source: str) -> tuple[jinja2.Template, _GenerationTracker]:
    """The template in a sandbox configured as transformers configures its own."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    tracker = next(e for e in env.extensions.values() if isinstance(e, _GenerationTracker))
    return env.from_string(source), tracker


def render(source: str, where: str, *, spans: bool = False, **context) -> tuple[str, Spans]:
    """The rendered text and, with `spans`, the span of each generation block in it."""
    try:
        template, tracker = _compile(source)
        if not spans:
            return template.render(**context), []
        blocks: list[str] = []
        found: Spans = []
        token = tracker.tracking.set((blocks, found))
        try:
            for block in template.generate(**context):
                blocks.append(block)  # appended as rendered: a block's start is the length so far
        finally:
            tracker.tracking.reset(token)
        return "".join(blocks), found
    except jinja2.TemplateError as e:
        raise NanotuneError(f"chat template of {where}: {e}") from e

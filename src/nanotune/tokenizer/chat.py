"""Chat templates: jinja in the sandbox transformers uses, with its `{% generation %}` tag.

A template marks what the assistant writes with `{% generation %}` … `{% endgeneration %}`
(transformers' `AssistantTracker`); rendering with `spans=True` returns the character span of
each such block in the output, which `return_assistant_tokens_mask` turns into token labels.

A template comes with a model or a recipe, so it is bounded as untrusted input (a chat template
refused is one line naming what it did):
- it is one piece: `{% include %}`, `{% import %}`, `{% from %}` and `{% extends %}` are refused
  (there are no other templates to read);
- `range()` counts at most `MAX_RANGE` items in one render, all its calls together;
- every string, list or number it makes, and its output, holds at most `MAX_SIZE` characters or
  items (a number at most `MAX_INT_BITS` bits); where one step could make far more than its
  inputs (`'x' * n`, `2 ** n`, a width such as `ljust(n)` or `'{:>n}'`, `replace`, `join`,
  `indent`, `sum`), the size is checked before the step runs.
It bounds memory, not time spent: it is no CPU meter.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import string
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SecurityError

from nanotune.errors import NanotuneError

Spans = list[tuple[int, int]]  # (start, end) character positions in the rendered text

MAX_SIZE = 1 << 22
"""Characters (or items) in any value a chat template makes, and in its output: 4M characters,
~1M tokens, past any model's context (unbounded, `{{ 'x' * 10**10 }}` takes the memory)."""
MAX_INT_BITS = 4096
"""Bits in any integer a chat template makes (`2 ** (10**10)` would take the CPU and memory)."""
# The constructs that read another template: none exists for a chat template.
_OTHER_TEMPLATES = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from … import",
    nodes.Extends: "extends",
}

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


# --- bounds (see the module's docstring) ------------------------------------------------------

# What one render may still count with range(); set by `render`, per render (and thread).
_range_left: ContextVar[list[int] | None] = ContextVar("nanotune_range_left", default=None)


def _over(what: str, limit: int = MAX_SIZE, unit: str = "characters") -> SecurityError:
    return SecurityError(f"{what}, over the {limit:,} {unit} a chat template may make")


def _checked(value: Any) -> Any:
    """`value`, refused when over the bounds."""
    if type(value) is str:  # the usual value, first
        if len(value) > MAX_SIZE:
            raise _over(f"a string of {len(value):,} characters")
    elif isinstance(value, (str, list, tuple, dict, set)) and len(value) > MAX_SIZE:
        raise _over(f"a {type(value).__name__} of {len(value):,} items", unit="items")
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _over(f"a number of {value.bit_length():,} bits", MAX_INT_BITS, "bits")
    return value


def _check_size(what: str, n: int) -> None:
    if n > MAX_SIZE:
        raise _over(f"{what} would make {n:,} characters")


def _check_counts(what: str, values: Iterable[Any]) -> None:
    """Widths and counts (`ljust(n)`, `batch(n)`) at most MAX_SIZE."""
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_SIZE:
            raise _over(f"{what} asks for {v:,}")


def _spec_widths(spec: str) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", spec)]


def _check_format_string(fmt: str) -> None:
    """A str.format string's widths and precisions, before it runs."""
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is not None and spec:
            if "{" in spec:
                raise SecurityError(
                    f"format spec {{{name}:{spec}}}: a chat template's widths must be written out"
                )
            _check_counts(f"format spec {{{name}:{spec}}}", _spec_widths(spec))


def _check_printf(fmt: str) -> None:
    """A `%` format's widths and precisions, before it runs."""
    for spec in re.findall(r"%(?:\([^)]*\))?([-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[a-zA-Z%]?)", fmt):
        if "*" in spec:
            raise SecurityError(f"%{spec}: a chat template's widths must be written out")
        _check_counts(f"%{spec}", _spec_widths(spec))


def _sized(items: Any) -> int | None:
    """Total length of a list or tuple of sized things (strings, lists), else None."""
    if isinstance(items, (list, tuple)) and all(isinstance(x, (str, list, tuple)) for x in items):
        return sum(len(x) for x in items)
    return None


def _replaced(s: Any, old: Any, new: Any, count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_size("replace", len(s) + n * len(new))


def _joined(sep: Any, items: Any) -> None:
    total = _sized(items)
    if total is not None and isinstance(sep, str):
        _check_size("join", total + len(sep) * max(len(items) - 1, 0))


def _check_str_method(method: Any, args: tuple, kwargs: dict) -> None:
    """A call of a string's own method (`'x'.ljust(n)`), before it runs."""
    s, name = method.__self__, method.__name__
    _check_counts(name, [*args, *kwargs.values()])
    if name == "replace" and len(args) >= 2:
        _replaced(s, *args[:3])
    elif name == "join" and args:
        _joined(s, args[0])
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            _check_size("expandtabs", len(s) + s.count("\t") * tabsize)


def _indent_size(a: dict[str, Any]) -> None:
    s, width = a.get("s"), a.get("width", 4)
    if isinstance(s, str):
        pad = width if isinstance(width, int) else len(str(width))
        _check_size("indent", len(s) + (s.count("\n") + 1) * pad)


def _wordwrap_size(a: dict[str, Any]) -> None:
    s, width, wrap = a.get("s"), a.get("width", 79), a.get("wrapstring") or "\n"
    if isinstance(s, str) and isinstance(width, int) and isinstance(wrap, str):
        breaks = len(s) // max(width, 1) + s.count("\n") + 1
        _check_size("wordwrap", len(s) + breaks * len(wrap))


def _sum_size(a: dict[str, Any]) -> None:
    total = _sized(a.get("iterable"))
    if total is not None:
        _check_size("sum", total)


# Filters that can make far more than they are given: a check of their arguments, by name.
_FILTER_SIZES: dict[str, Callable[[dict[str, Any]], None]] = {
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": lambda a: _replaced(a.get("s"), a.get("old"), a.get("new"), a.get("count")),
    "join": lambda a: _joined(a.get("d", ""), a.get("value")),
    "sum": _sum_size,
    "format": lambda a: _check_printf(a["value"]) if isinstance(a.get("value"), str) else None,
}


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """`f` with its widths and counts checked before it runs, and its result after."""
    sig = inspect.signature(f)
    lead = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1  # context, the value
    sizes = _FILTER_SIZES.get(name)

    @functools.wraps(f)  # keeps `jinja_pass_arg`: jinja still passes the context
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if name != "format":  # its arguments are values, not widths
            _check_counts(name, [*args[lead:], *kwargs.values()])
        if sizes is not None:
            try:
                arguments = sig.bind(*args, **kwargs).arguments
            except TypeError:
                arguments = None  # the call itself fails, with Python's message
            if arguments is not None:
                sizes(arguments)
        return _checked(f(*args, **kwargs))

    return bounded


def _range(*args: Any) -> range:
    """range(), counting at most MAX_RANGE items in one render (all calls together)."""
    try:
        items = range(*args)
    except TypeError as e:
        raise jinja2.TemplateRuntimeError(f"range({', '.join(map(repr, args))}): {e}") from e
    left = _range_left.get() or [MAX_RANGE]
    if len(items) > left[0]:
        raise SecurityError(
            f"range({', '.join(map(repr, args))}) would count past the {MAX_RANGE:,} items a "
            "chat template may count in one render (all its range() calls together)"
        )
    left[0] -= len(items)
    return items


def _bounded_lipsum(lipsum: Callable[..., str]) -> Callable[..., str]:
    """jinja's lipsum(n, html, min, max): n paragraphs of up to max words, each word ~12
    characters at most, checked before it runs."""

    @functools.wraps(lipsum)
    def bounded(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
        if isinstance(n, int) and isinstance(max, int):
            _check_size("lipsum", n * max * 12)
        return lipsum(n, html, min, max)

    return bounded


class _Output(list):
    """What a block or macro writes, refused as it grows past MAX_SIZE characters (a loop could
    write a new string of MAX_SIZE at every step before the block ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def append(self, part: str) -> None:
        self.size += len(part)
        _check_size("the rendered text", self.size)
        super().append(part)

    def extend(self, parts: Iterable[str]) -> None:
        for part in parts:
            self.append(part)


class _CodeGenerator(CodeGenerator):
    def buffer(self, frame: Any) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        # `a ~ b`: the joined string is checked (each part already is; a loop could double it).
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with every value a template makes held to the bounds."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    output_buffer = _Output
    checked = staticmethod(_checked)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["lipsum"] = _bounded_lipsum(self.globals["lipsum"])
        self.globals["range"] = _range
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """The output of a block, a macro or a whole render, checked before it is joined."""
        parts = list(parts)
        _check_size("the rendered text", sum(len(p) for p in parts))
        return "".join(parts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":  # the usual one (`'<|im_start|>' + role`), first
            return _checked(left + right)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size("*", len(seq) * n)
            if isinstance(left, int) and isinstance(right, int):
                if (bits := left.bit_length() + right.bit_length()) > MAX_INT_BITS:
                    raise _over(f"* would make a number of {bits:,} bits", MAX_INT_BITS, "bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and (bits := left.bit_length() * right) > MAX_INT_BITS:
                raise _over(f"** would make a number of {bits:,} bits", MAX_INT_BITS, "bits")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left)
        return _checked(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(obj, "__self__", None), str):
            _check_str_method(obj, args, kwargs)
        return _checked(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapped)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format_string(fmt)
            return _checked(wrapped(*args, **kwargs))

        return bounded


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

    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, loopcontrols]
    )
    env.filters["tojson"] = _bounded_filter("tojson", tojson)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    tracker = next(e for e in env.extensions.values() if isinstance(e, _GenerationTracker))
    tree = env.parse(source)
    for node in tree.find_all(tuple(_OTHER_TEMPLATES)):
        raise SecurityError(
            f"{{% {_OTHER_TEMPLATES[type(node)]} %}} on line {node.lineno} reads another "
            "template, and a chat template has none to read: write it in one piece"
        )
    return env.from_string(tree), tracker


# What a template's own code raises (`{{ 1 / 0 }}`, `{{ 'a' + 1 }}`, a macro calling itself):
# its author's error, told in one line like a TemplateError.
_TEMPLATE_FAULTS = (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError)


def render(source: str, where: str, *, spans: bool = False, **context) -> tuple[str, Spans]:
    """The rendered text and, with `spans`, the span of each generation block in it."""
    blocks: list[str] = []
    found: Spans = []
    left = _range_left.set([MAX_RANGE])
    try:
        template, tracker = _compile(source)
        token = tracker.tracking.set((blocks, found) if spans else None)
        try:
            size = 0
            for block in template.generate(**context):
                size += len(block)
                _check_size("the rendered text", size)
                blocks.append(block)  # appended as rendered: a block's start is the length so far
        finally:
            tracker.tracking.reset(token)
    except _TEMPLATE_FAULTS as e:  # RecursionError is a RuntimeError: caught on its own
        said = (str(e).splitlines() or [""])[0]
        if not isinstance(e, jinja2.TemplateError):
            said = f"{type(e).__name__}: {said}"
        raise NanotuneError(f"chat template of {where}: {said}") from e
    except RecursionError as e:
        raise NanotuneError(f"chat template of {where}: calls itself too deeply ({e})") from e
    finally:
        _range_left.reset(left)
    return "".join(blocks), found

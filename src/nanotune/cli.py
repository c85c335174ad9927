"""The `nanotune` command: a table of subcommands, each a dataclass of options and the job it runs.

The options come from the dataclasses' fields (`jobs/config.py`, `serve/config.py`,
`bench/config.py`): a field's type gives the option's kind and choices, its default the
default, the doc under it the help. Rules live with the jobs, not here. Errors a user can cause
are `NanotuneError`s: printed as one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
import textwrap
import types
import typing
from typing import Any

from nanotune.bench.config import BenchCommand
from nanotune.config import config_reference, doc_line
from nanotune.errors import NanotuneError
from nanotune.jobs import config as jobs
from nanotune.serve.config import ServeCommand
from nanotune.version import __version__

# name: (the options, the job that runs them as "module:function", loaded when it runs).
COMMANDS: dict[str, tuple[type, str]] = {
    "generate": (jobs.GenerateCommand, "nanotune.jobs.generate:generate_command"),
    "chat": (jobs.ChatCommand, "nanotune.jobs.generate:chat_command"),
    "models": (jobs.ModelsCommand, "nanotune.jobs.listing:models_command"),
    "export": (jobs.ExportCommand, "nanotune.jobs.export:export_command"),
    "eval": (jobs.EvalCommand, "nanotune.jobs.evaluate:eval_command"),
    "merge": (jobs.MergeCommand, "nanotune.jobs.artifacts:merge_command"),
    "classify": (jobs.ClassifyCommand, "nanotune.jobs.classify:classify_command"),
    "bench": (BenchCommand, "nanotune.bench.suite:bench_command"),
    "train": (jobs.TrainCommand, "nanotune.jobs.finetune:train_command"),
    "recipes": (jobs.RecipesCommand, "nanotune.jobs.listing:recipes_command"),
    "demo": (jobs.DemoCommand, "nanotune.jobs.demo:demo_command"),
    "push": (jobs.PushCommand, "nanotune.jobs.artifacts:push_command"),
    "serve": (ServeCommand, "nanotune.serve.run:serve_command"),
}
EPILOGS = {"train": config_reference}


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, evaluated once (the annotations are strings)."""
    return typing.get_type_hints(cls)


def _value_type(tp: Any) -> Any:
    """An optional field's value type (`int | None` -> int)."""
    present = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(present) == 1:
        return present[0]
    return tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _add_option(group, cls: type, f: dataclasses.Field, dest: str, default: Any, aliases=()):
    """`--field-name` for field `f` of `cls`: its type, default and attribute doc as help."""
    tp = _value_type(_hints(cls)[f.name])
    kw: dict[str, Any] = {}
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is typing.Literal:
        kw["choices"] = typing.get_args(tp)
    elif typing.get_origin(tp) is list:
        kw.update(type=_comma_list, metavar="A,B")
    elif typing.get_origin(tp) is tuple:  # repeatable
        item = typing.get_args(tp)[0]
        kw.update(action="append", type=item, metavar={int: "N"}.get(item, "TEXT"))
        default = None if default is None else list(default)
    elif tp in (int, float, str):
        kw.update(type=tp, metavar={int: "N", float: "X", str: "TEXT"}[tp])
    else:
        raise TypeError(f"no command-line option for {cls.__name__}.{f.name}: {tp!r}")
    shown = f.default  # a computed default (an environment variable's value) is not shown
    hidden = shown is None or shown is False or shown is dataclasses.MISSING or shown in ("", ())
    note = "" if hidden else f" (default: {shown})"
    flag = "--" + f.name.replace("_", "-")
    help_text = (doc_line(cls, f.name) + note).replace("%", "%%")
    group.add_argument(flag, *aliases, dest=dest, default=default, help=help_text, **kw)


def _add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """The options of dataclass `cls`: a positional per `positional` field, a group per section
    or nested dataclass, an option per other field."""
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, _value_type(_hints(cls)[f.name])
        if "positional" in meta:
            nargs = meta["positional"]
            kw = {} if nargs == 1 else {"nargs": nargs, "default": _default(f)}
            parser.add_argument(f.name, metavar=f.name.upper(), help=doc_line(cls, f.name), **kw)
        elif "section" in meta:  # values given here override the section's
            section = meta["section"]
            title = f.name.removesuffix("_section")
            group = parser.add_argument_group(title, doc_line(cls, f.name))
            by_name = {s.name: s for s in dataclasses.fields(section)}
            for name in meta["only"]:
                aliases = meta["aliases"].get(name, ())
                _add_option(group, section, by_name[name], f"{f.name}.{name}", None, aliases)
        elif dataclasses.is_dataclass(tp):
            group = parser.add_argument_group(f.name, doc_line(cls, f.name))
            for sub in dataclasses.fields(tp):
                _add_option(group, tp, sub, f"{f.name}.{sub.name}", _default(sub))
        else:
            _add_option(parser, cls, f, f.name, _default(f))


def options(cls: type, args: argparse.Namespace) -> Any:
    """The `cls` object the parsed `args` describe (its checks run here, before any job)."""
    values, kw = vars(args), {}
    for f in dataclasses.fields(cls):
        tp = _value_type(_hints(cls)[f.name])
        if "section" in f.metadata:
            given = {n: values[f"{f.name}.{n}"] for n in f.metadata["only"]}
            kw[f.name] = {n: v for n, v in given.items() if v is not None}
        elif dataclasses.is_dataclass(tp) and "positional" not in f.metadata:
            kw[f.name] = tp(
                **{s.name: values[f"{f.name}.{s.name}"] for s in dataclasses.fields(tp)}
            )
        elif typing.get_origin(tp) is tuple:
            kw[f.name] = tuple(values[f.name] or ())
        else:
            kw[f.name] = values[f.name]
    return cls(**kw)


class _Parser(argparse.ArgumentParser):
    """The top-level parser. argparse fills a nargs="*" positional from one run of positionals
    only, so `train my.yaml --resume train.lr=1e-4` would leave train.lr=1e-4 unrecognised: the
    subcommands taking KEY=VALUE overrides take them among their flags."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        sub = self.intermixed.get(args[0]) if args else None
        if sub is None:
            return super().parse_known_args(args, namespace)
        namespace = argparse.Namespace() if namespace is None else namespace
        namespace.command = args[0]
        return sub.parse_known_intermixed_args(args[1:], namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nanotune", description="Fine-tune GPT-2 and other small language models."
    )
    parser.add_argument("--version", action="version", version=f"nanotune {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    parser.intermixed = {}
    for name, (cls, _) in COMMANDS.items():
        help_line, _, rest = (cls.__doc__ or "").partition("\n\n")
        epilog = EPILOGS.get(name)
        p = sub.add_parser(
            name,
            help=help_line.strip(),
            description=textwrap.fill(" ".join((rest or help_line).split()), 88),
            epilog=epilog() if epilog else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_options(p, cls)
        if any(f.name == "overrides" for f in dataclasses.fields(cls)):
            parser.intermixed[name] = p
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls, job = COMMANDS[args.command]
    try:
        module, _, function = job.partition(":")
        chosen = options(cls, args)
        return getattr(importlib.import_module(module), function)(chosen) or 0
    except NanotuneError as e:
        # One line, whatever a library put into the message it wraps.
        print(f"nanotune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train's Interrupted says what it saved and its signal
        print(f"nanotune: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())

"""RunConfig: one fine-tuning job as typed sections, read from and written to YAML.

Sections are dataclasses; one generic loader checks every section the same way: unknown keys
(with the closest valid name), value types, then the section's own `__post_init__` checks.
Overrides `train.lr=1e-4 method.r=8` are parsed with YAML scalar rules; an error they cause
names the override, one in the file names the file. Float fields must be finite: YAML reads
`.inf` and `.nan` as numbers, which would train on garbage.

Every field has an attribute docstring (a string literal under it); `field_docs` reads them, and
`nanotune train --help` lists every field from them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nanotune.data.config import DataConfig
from nanotune.data.formats import FORMATS
from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.files.atomic import atomic_write
from nanotune.methods.config import MethodConfig
from nanotune.models.config import DEFAULT_MODEL
from nanotune.training.config import PreferenceConfig, TrainConfig
from nanotune.training.rl_config import RLConfig


@dataclass
class ModelSection:
    """Which base model to start from."""

    name: str = DEFAULT_MODEL
    """Preset, alias, local HF folder, .gguf file or hub id (see `nanotune.weights.load_model`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the loaded weights (float32 on CPU)."""
    special_tokens: list[str] = field(default_factory=list)
    """Extra special tokens to add; the embedding (and tied head) grows to hold them."""


@dataclass
class RunConfig:
    """A whole run: model, method, data, training, evaluation and where to write the results."""

    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """What preference pairs train (data.format: preference): DPO, SimPO, ORPO or a reward model."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Online RL from reward functions (rl.algorithm: grpo) on the data's prompts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/run"
    """The run directory: config.yaml, metrics.jsonl, checkpoints/, final/."""

    def __post_init__(self) -> None:
        # `~` is expanded only by a shell, and not inside YAML or `key=~/x`. Data sources and
        # model names expand it where they are read; these two are handed on as they are.
        self.output_dir = os.path.expanduser(self.output_dir)
        if self.eval.reward_model and self.eval.reward_model.startswith("~"):
            self.eval.reward_model = os.path.expanduser(self.eval.reward_model)
        objective = self.preference.objective
        if objective is not None and FORMATS[self.data.format].task != "preference":
            raise NanotuneError(
                f"preference.objective: {objective} learns from preference pairs, but "
                f"data.format is {self.data.format}; set data.format: preference (rows with "
                "prompt/chosen/rejected) or remove preference.objective"
            )
        if self.rl.algorithm is not None and FORMATS[self.data.format].task != "lm":
            raise NanotuneError(
                f"rl.algorithm: {self.rl.algorithm} samples answers to prompts, but data.format "
                f"{self.data.format} has none; use completion or chat rows (the answer is the "
                "reference the rewards compare with)"
            )
        if objective == "reward" and self.eval.generation_metrics:
            raise NanotuneError(
                f"eval.metrics: {', '.join(self.eval.generation_metrics)} score generated text, "
                "but a reward model (preference.objective: reward) generates none; use "
                "metrics: [preference] (how often it scores chosen above rejected)"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config atomically."""
        return atomic_write(path, self.to_yaml())

    @classmethod
    def from_dict(
        cls, data: Any, overrides: list[str] = (), source: str | Path | None = None
    ) -> RunConfig:
        """RunConfig from a recipe mapping and `key=value` overrides. An error names the
        override that caused it, else `source` (the file the mapping came from) when given."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            what = f"{source}: the config" if source else "config"
            raise NanotuneError(
                f"{what}: the top level must be a mapping, got {type(data).__name__}"
            )
        data = _renamed(data)
        merged = apply_overrides(data, overrides)  # its errors name the override already
        try:
            return _load_run(cls, merged)
        except NanotuneError as e:
            blamed = _blame(str(e), overrides)
            if blamed is None and overrides:
                try:
                    _load_run(cls, data)
                except NanotuneError:
                    pass
                else:  # the file alone is fine: the overrides together broke it
                    blamed = f"overrides {' '.join(overrides)}"
            if blamed is None and source is not None:
                blamed = str(source)
            if blamed is None:
                raise
            raise NanotuneError(f"{blamed}: {e}") from e

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise NanotuneError(f"{path}: cannot read the config ({e.strerror})") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise NanotuneError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
        return cls.from_dict(data, overrides, source=path)


def _load_run(cls: type, data: dict[str, Any]) -> RunConfig:
    if isinstance(data.get("model"), str):  # `model: gpt2` / `model=./folder` name the model
        data = {**data, "model": {"name": data["model"]}}
    return load_dataclass(cls, data, "")


def _blame(message: str, overrides: list[str]) -> str | None:
    """`override K=V` for the override whose key the error message starts with, else None."""
    where = re.match(r"[A-Za-z_][\w.]*", message)
    if where is None:
        return None
    field_key = where.group(0)
    for item in reversed(overrides):  # the last one given wins, so it is the one to blame
        key = _renamed_key(item.partition("=")[0])
        if field_key == key or field_key.startswith(key + ".") or key.startswith(field_key + "."):
            return f"override {item}"
    return None


def _plain(value: Any) -> Any:
    """YAML-safe: tuples become lists, paths strings."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def apply_overrides(data: Any, overrides: list[str]) -> dict[str, Any]:
    """Set `a.b=value` pairs in a copy of `data`; values follow YAML scalar rules."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise NanotuneError(f"override {item}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key = _renamed_key(key)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            why = getattr(e, "problem", None) or str(e).splitlines()[0]  # one line, not the mark
            raise NanotuneError(f"override {item}: value is not valid YAML ({why})") from e
        if isinstance(value, (dict, list)) and raw.lstrip().startswith(("{", "[")):
            value = (_FlowDict if isinstance(value, dict) else _FlowList)(value)
            value.raw = raw
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise NanotuneError(f"override {item}: {part} is not a section")
            node[part] = child = dict(child)
            node = child
        node[leaf] = value
    return data


class _Flow:
    """A mapping or list YAML made of an override's `{...}` / `[...]` text, which it keeps: a
    string field given one (`data.prompt_template={quote}`) can then show how to quote it."""

    raw: str


class _FlowDict(dict, _Flow):
    pass


class _FlowList(list, _Flow):
    pass


def _quote_hint(key: str, value: dict | list) -> str:
    kind = "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, _Flow):
        example = f"\"{key}='{value.raw}'\" (the outer quotes are for the shell)"
    else:
        example = f"{key.rpartition('.')[2]}: '{{name}}'"
    return f"; YAML reads text starting with {{ or [ as {kind}: quote it, e.g. {example}"


def load_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; `where` names the section."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NanotuneError(
            f"{where or 'config'}: expected a mapping of options, got "
            f"{'list' if isinstance(data, list) else type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise NanotuneError(f"{prefix}{key}: unknown key; {_suggest(cls, str(key), where)}")
        kwargs[key] = _check(hints[key], value, f"{prefix}{key}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise NanotuneError(f"{prefix}{missing[0]}: required; add a '{missing[0]}:' section")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise NanotuneError(f"{where or 'config'}: {e}") from e


# Old nanotune names, still read from YAML and overrides; a saved config.yaml has the new ones.
RENAMED_KEYS = {
    "data.block_size": "data.chunk_tokens",
    "method.block_size": "method.nf4_block",
}
# Other spellings of choice values, read as the name they stand for (and saved as that name).
VALUE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "ppl": "perplexity",
}
# Names users bring from transformers/peft/trl: never accepted, but an unknown key that is one
# of them is told the nanotune field to write instead (a dotted name, or what to do).
FOREIGN_KEYS = {
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.schedule",
    "scheduler": "train.schedule",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "num_train_epochs": "train.epochs",
    "warmup": "train.warmup_steps",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "logging_steps": "train.log_every",
    "save_total_limit": "train.keep_last",
    "lora_r": "method.r",
    "rank": "method.r",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "target_modules": "method.targets",
    "model_name_or_path": "model",
    "output": "output_dir",
}
FOREIGN_HINTS = {
    "bf16": "write train.dtype: bfloat16 (autocast compute) and/or model.dtype: bfloat16 "
    "(the weights as loaded)",
    "fp16": "write train.dtype: float16 (autocast compute with a loss scaler) and/or "
    "model.dtype: float16 (the weights as loaded)",
    "load_best_model_at_end": "nanotune restores the best evaluation's weights before the run "
    "ends by default: train.keep_best (true), judged every train.eval_every steps",
}


def _renamed_key(dotted: str) -> str:
    return RENAMED_KEYS.get(dotted, dotted)


def _renamed(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with RENAMED_KEYS under their new names (both given is an error)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED_KEYS.items():
        section, old_leaf = old.split(".")
        new_leaf = new.split(".")[1]
        node = data.get(section)
        if isinstance(node, dict) and old_leaf in node:
            if new_leaf in node:
                raise NanotuneError(f"{old}: also given as {new} (its new name); keep one")
            node[new_leaf] = node.pop(old_leaf)
    return data


def _suggest(cls: type, key: str, where: str) -> str:
    """Did-you-mean for an unknown key of section `cls` (at `where`; "" = the top level)."""
    if key in FOREIGN_HINTS:
        return FOREIGN_HINTS[key]
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    candidates: dict[str, list[str]] = {n: [n] for n in names}
    if not where:  # a section's field written at the top level: name it with its section
        hints = typing.get_type_hints(cls)
        for n in names:
            if dataclasses.is_dataclass(hints[n]):
                for f in dataclasses.fields(hints[n]):
                    candidates.setdefault(f.name, []).append(f"{n}.{f.name}")
    for alias, target in FOREIGN_KEYS.items():
        section, _, leaf = target.rpartition(".")
        candidates[alias] = [leaf if section == where else target]
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(map(repr, candidates[close[0]]))}?"
    return f"valid keys: {', '.join(names)}"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal under the field), dedented."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen app): help without the docs
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def type_name(tp: Any) -> str:
    """How a field's type reads in messages and --help: `int`, `float | null`, `a | b`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(tp: Any, value: Any, key: str) -> Any:
    """`value` converted to type `tp`, or a NanotuneError naming `key` and what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return load_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, key)
            except NanotuneError as e:
                errors.append(e)
        # A near miss of a choice (`all_linear`) is that choice's error, with its suggestion.
        errors.sort(key=lambda e: "did you mean" not in str(e))
        raise (
            errors[0]
            if len(errors) == 1 or "did you mean" in str(errors[0])
            else NanotuneError(
                f"{key}: expected {' or '.join(type_name(a) for a in args)}, got {value!r}"
            )
        )
    if origin is Literal:
        value = VALUE_ALIASES.get(value, value) if isinstance(value, str) else value
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NanotuneError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise NanotuneError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise NanotuneError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(
                _check(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        out = [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise NanotuneError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_check(kt, k, key): _check(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise NanotuneError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise NanotuneError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() reads as a number.
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise NanotuneError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise NanotuneError(f"{key}: expected a finite number, got {number}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            hint = _quote_hint(key, value) if isinstance(value, (dict, list)) else ""
            raise NanotuneError(f"{key}: expected a string, got {value!r}{hint}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise NanotuneError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"{key}: the config loader does not handle type {tp!r}")


def load_config(name_or_path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """RunConfig from a YAML file, or from a packaged recipe by name (`nanotune/recipes/*.yaml`)."""
    from importlib import resources

    if Path(name_or_path).is_file():
        return RunConfig.from_yaml(name_or_path, overrides)
    packaged = resources.files("nanotune") / "recipes"
    # An empty recipes folder is not in git, so a source checkout may lack it.
    found = packaged.iterdir() if packaged.is_dir() else []
    names = sorted(f.name.removesuffix(".yaml") for f in found if f.name.endswith(".yaml"))
    if str(name_or_path) not in names:
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NanotuneError(
            f"{name_or_path}: no such config file or packaged recipe; {hint}"
            f"packaged recipes: {', '.join(names) or 'none'}"
        )
    with resources.as_file(packaged / f"{name_or_path}.yaml") as path:
        return RunConfig.from_yaml(path, overrides)


def doc_line(cls: type, name: str) -> str:
    """The first paragraph of a field's attribute docstring, as one line."""
    return " ".join(field_docs(cls).get(name, "").split("\n\n")[0].split())


def config_reference() -> str:
    """Every config field, by section: dotted name, type, default and its one-line doc (the
    epilog of `nanotune train --help`)."""
    lines = ["config fields (YAML keys, or KEY=VALUE overrides):"]
    hints = typing.get_type_hints(RunConfig)
    top = []
    for section in dataclasses.fields(RunConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            top.append(section)
            continue
        lines += ["", f"{section.name}:"]
        lines += _field_lines(cls, dataclasses.fields(cls), f"{section.name}.")
    return "\n".join([*lines, "", "run:", *_field_lines(RunConfig, top, "")])


def _yaml_value(value: Any) -> str:
    """A default as YAML writes it (true, null, '', [a, b])."""
    value = list(value) if isinstance(value, tuple) else value  # betas: (0.9, 0.999)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _field_lines(cls: type, fields: list[dataclasses.Field], prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields:
        if f.default_factory is not dataclasses.MISSING:
            shown = _yaml_value(f.default_factory())
        elif f.default is not dataclasses.MISSING:
            shown = _yaml_value(f.default)
        else:
            shown = "(required)"
        out.append(f"  {prefix}{f.name}: {type_name(hints[f.name])} = {shown}")
        out.append(f"      {doc_line(cls, f.name)}")
    return out

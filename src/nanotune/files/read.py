"""Checked readers for model, adapter and tokenizer files.

Every decode or IO failure (missing, unreadable, truncated, not JSON, not an object) becomes one
NanotuneError naming the file, what it should be and the fix; weights with NaN or inf are refused
here too, so a broken download never reaches training or generation as garbage.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from nanotune.errors import NanotuneError

REFETCH = "re-download or re-save it"


def read_text(path: str | os.PathLike, what: str, fix: str = REFETCH) -> str:
    """The UTF-8 text of `what` (e.g. "the chat template") at `path`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NanotuneError(f"{path} is missing: {what} should be there; {fix}") from None
    except UnicodeDecodeError as e:
        raise NanotuneError(f"{path} is not UTF-8 text ({what}: {e.reason}); {fix}") from None
    except OSError as e:
        raise NanotuneError(f"{path}: cannot read {what} ({e.strerror}); {fix}") from None


def read_json(path: str | os.PathLike, what: str, fix: str = REFETCH) -> Any:
    """Any JSON value of `what` at `path`."""
    text = read_text(path, what, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NanotuneError(
            f"{path} is not valid JSON ({what}; line {e.lineno} column {e.colno}: {e.msg}); {fix}"
        ) from None


def read_json_object(path: str | os.PathLike, what: str, fix: str = REFETCH) -> dict[str, Any]:
    """The JSON object (mapping) of `what` at `path`; a list or scalar is refused."""
    data = read_json(path, what, fix)
    if not isinstance(data, dict):
        raise NanotuneError(
            f"{path} should hold a JSON object ({what}), not a JSON {_json_kind(data)}; {fix}"
        )
    return data


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def read_safetensors(path: str | os.PathLike, what: str, fix: str = REFETCH) -> dict[str, Tensor]:
    """Every tensor of the safetensors file `path` (`what`: e.g. "the model weights"), on CPU."""
    path = Path(path)
    try:
        return load_file(path)
    except FileNotFoundError:
        raise NanotuneError(f"{path} is missing: {what} should be there; {fix}") from None
    except (SafetensorError, OSError) as e:
        raise NanotuneError(f"{path} is truncated or corrupt ({what}: {e}); {fix}") from None


def read_torch_pickle(path: str | os.PathLike, what: str, fix: str = REFETCH) -> dict[str, Tensor]:
    """A state dict of tensors from a PyTorch pickle, read with weights_only=True.

    weights_only: a file can then not run code while it loads (a crafted `__reduce__` is refused
    by torch's restricted unpickler instead of executed).
    """
    path = Path(path)
    try:
        # mmap needs torch's zip format; the legacy bare-pickle format is read whole.
        mmap = zipfile.is_zipfile(path)
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise NanotuneError(f"{path} is missing: {what} should be there; {fix}") from None
    except Exception as e:  # torch raises many types for bad pickles and zips
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            # Not torch's text: it advises retrying with weights_only=False.
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            asks = f"asks for {found[1]}" if found else "holds Python objects besides tensors"
            raise NanotuneError(
                f"{path} could not be read as a weights-only PyTorch checkpoint ({what}): it "
                f"{asks}, which could run code when loaded; convert a copy you trust to "
                "safetensors (or re-download it if it is damaged)"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanotuneError(
            f"{path} could not be read as a weights-only PyTorch checkpoint ({what}: {reason}); "
            "re-download it or convert it to safetensors"
        ) from None
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()
    ):
        raise NanotuneError(f"{path} does not hold a plain state dict of tensors ({what}); {fix}")
    return sd


def check_finite(tensors: dict[str, Tensor], path: str | os.PathLike, fix: str = REFETCH) -> None:
    """Refuse weights holding NaN or inf: they load fine and then generate garbage."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise NanotuneError(f"{path}: tensor {name!r} holds {kind} values; {fix}")

"""Hugging Face hub downloads: safe files only, the shared cache, a fast clear failure offline."""

from __future__ import annotations

import os
from pathlib import Path

from nanotune.errors import NanotuneError, OfflineError

# Config, safetensors weights and tokenizer files; never pickles, ONNX or other formats.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "tokenizer*", "*.jinja"]
ETAG_TIMEOUT_S = 5.0  # a hung network should fail in seconds, not minutes


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> Path | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None


def download(hub_id: str, *, name: str | None = None) -> Path:
    """Local snapshot folder of `hub_id` (from the cache, or downloaded when online).

    `name` is what the user typed (a preset name, say), used in error messages.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = name or hub_id
    offline = _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE
    unreachable = (
        f"model {shown!r} is not in the local Hugging Face cache and the hub is unreachable"
        + (" (HF_HUB_OFFLINE is set)" if offline else "")
    )
    fix = (
        "download it once online, or pass a local folder with config.json + model.safetensors "
        "(e.g. --model ./my-gpt2)"
    )
    try:
        path = snapshot_download(
            hub_id,
            cache_dir=_cache_dir(),
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
            etag_timeout=ETAG_TIMEOUT_S,
        )
    except GatedRepoError:
        raise NanotuneError(
            f"hub repository {hub_id!r} is gated; accept its licence on huggingface.co and log in "
            "(hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise NanotuneError(
            f"hub repository {hub_id!r} does not exist or is private; check the id, or log in "
            "(hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise NanotuneError(f"hub repository {hub_id!r} has no 'main' revision") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise OfflineError(unreachable, fix) from None
    except HfHubHTTPError as e:
        raise NanotuneError(f"downloading {hub_id!r} from the hub failed: {e}") from None
    except OSError as e:  # e.g. a disk or cache-lock failure after the repository was found
        raise NanotuneError(f"downloading {hub_id!r} failed: {e}") from None
    path = Path(path)
    if not (path / "config.json").exists():
        raise NanotuneError(
            f"hub repository {hub_id!r} has no config.json with safetensors weights; nanotune "
            "loads Hugging Face transformers checkpoints (or a local .gguf file)"
        )
    return path


# Written by nanotune for its own bookkeeping, never part of a published model.
PUSH_IGNORE = [".nanotune", ".tmp-*", ".old-*"]


def push_token(repo_id: str, token: str | None = None) -> str:
    """The token to push `repo_id` with, checked before anything slow: refused offline, without a
    token, or for a malformed repository id."""
    from huggingface_hub import constants, get_token

    from nanotune.weights.resolve import HUB_ID

    if not HUB_ID.match(repo_id):
        raise NanotuneError(
            f"hub repository id {repo_id!r} is not of the form owner/name (e.g. you/my-lora)"
        )
    if _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        # Not an OfflineError: its fix is "load the model from local files", no help here.
        raise NanotuneError(
            f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it where the hub is "
            "reachable, then run nanotune push RUN_DIR REPO_ID"
        )
    token = token or get_token()
    if not token:
        raise NanotuneError(
            f"cannot push to {repo_id!r}: no Hugging Face token; pass --token, set HF_TOKEN or "
            "log in once (hf auth login)"
        )
    return token


def upload(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` if needed and upload the files of `folder` to it; the repository's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    token = push_token(repo_id, token)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            ignore_patterns=PUSH_IGNORE,
            commit_message="Upload with nanotune",
        )
    except HfHubHTTPError as e:
        raise NanotuneError(f"pushing {folder} to {repo_id!r} failed: {e}") from None
    except OSError as e:  # no route to the hub, a refused connection, a file read failure
        raise NanotuneError(
            f"pushing {folder} to {repo_id!r} failed ({e}); check the network and retry"
        ) from None
    return str(url)

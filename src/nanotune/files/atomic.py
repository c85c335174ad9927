"""The one writer: every artifact nanotune writes appears whole or not at all.

- `atomic_write(path, data)`: a file, written beside its name, fsynced, renamed over it;
  `atomic_file(path)` the same for a writer that opens the file itself (GGUF).
- `atomic_dir(directory, write, ...)`: a folder, filled by `write(tmp)` in a temporary folder and
  swapped in at the end; the old folder stays whole until the new one is complete.
- `RunDir`: the long-lived run directory, replaced under `--overwrite` only once the new run has
  something to keep.

Every folder nanotune owns carries a `.nanotune` marker naming its kind and the entries it may
hold. `--overwrite` replaces only such folders, and only when they hold nothing else; it never
touches the current folder, a parent of it, the home folder or a folder holding the run's own
inputs (`check_target`). A single file carries its mark inside (a GGUF's `nanotune.version`, a
Modelfile's first line): `--overwrite` replaces only a file its writer recognizes as its own
(`check_file_target`). Nothing is removed before every check has passed.

An output named by a symbolic link is written where the link points, and the link is kept: a run
reached through `runs/latest` is replaced in its folder, and `runs/latest` still leads to it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nanotune.errors import NanotuneError
from nanotune.version import __version__

MARKER = ".nanotune"
_TMP = ".tmp-"  # temporary siblings: .tmp-<pid>-<name>-<random>
# an old folder during a swap, or a run kept until its replacement ends: .old-<pid>-<name>
_OLD = ".old-"


# --- files -----------------------------------------------------------------------------------


def _through_link(path: Path) -> Path:
    """`path`, or where it leads when it is a symbolic link (moving the link itself aside would
    leave it behind, still leading to the old output, beside a new folder in its place)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind a failed write (torch.save, for one, wraps it in a RuntimeError)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def write_error(
    e: BaseException,
    path: Path,
    *,
    what: str = "",
    fix_space: str = "free some space and run again",
    fix_access: str = "choose a folder you can write to",
) -> NanotuneError | None:
    """The one line for a write of `path` that failed in the file system (a full disk, no
    permission, a file where a folder should be), else None: then it is a bug.

    `what` names the artifact ("checkpoint"); the fixes say what to do next.
    """
    cause = _os_error(e)
    full = (
        cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if cause is not None
        else f"(os error {errno.ENOSPC})" in str(e)  # safetensors says so only in its message
    )
    label = f"{what} {path}" if what else str(path)
    intact = f"the previous {what or 'version'} is intact"
    if full:
        return NanotuneError(
            f"no space left on {_mount_point(path.parent)} while writing {label}; {intact}; "
            f"{fix_space}"
        )
    if cause is not None:
        return NanotuneError(
            f"cannot write {label} ({cause.strerror or cause}: {cause.filename}); {intact}; "
            f"{fix_access}"
        )
    return None


@contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it is fsynced and renamed to `path`
    (a reader sees the old file or the new one, never half), on any failure it is removed."""
    path = _through_link(Path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP}{os.getpid()}-{path.name}-")
        os.close(fd)
    except OSError as e:
        raise (write_error(e, path) or e) from e
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if clear := write_error(e, path):
            raise clear from e
        raise


@contextmanager
def scratch_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` for an intermediate step (removed on exit, however it
    exits), named as `atomic_file` names its own so that `clean_leftovers(path)` removes it
    when a killed process leaves it behind."""
    path = _through_link(Path(path))
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP}{os.getpid()}-{path.name}-")
        os.close(fd)
    except OSError as e:
        raise (write_error(e, path) or e) from e
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o644) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half."""
    with atomic_file(path, mode=mode) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


# --- ownership and overwrite checks ----------------------------------------------------------


def write_marker(directory: Path, kind: str, owns: Iterable[str]) -> None:
    meta = {"nanotune": __version__, "kind": kind, "owns": sorted(set(owns) | {MARKER})}
    atomic_write(directory / MARKER, json.dumps(meta, indent=1) + "\n")


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when nanotune did not write the folder."""
    try:
        meta = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("owns"), list) else None


def _foreign(directory: Path, meta: dict[str, Any]) -> list[str]:
    """Entries of `directory` that nanotune did not write there (its own temp files aside)."""
    owns = set(meta["owns"])
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name not in owns and not p.name.startswith((_TMP, _OLD))
    )


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_target(
    target: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output folder",
    flag: str = "--overwrite",
) -> bool:
    """Check that writing `target` loses nothing of the user's; True when it already exists.

    A missing or empty folder is always fine. An existing one needs `overwrite`, must carry
    nanotune's marker, must hold nothing nanotune did not write, and must not be (or contain) the
    current folder, the home folder or any of `inputs` (the run's config, data, model, adapter).
    """
    target = _through_link(Path(target).expanduser())
    # A killed writer's leftovers first: an old folder it had moved aside is put back, so the
    # checks below see what the user really has there.
    clean_leftovers(target)
    if target.exists() and not target.is_dir():
        raise NanotuneError(f"{target} exists and is not a folder; choose another {what}")
    if not target.exists() or not any(target.iterdir()):
        return False
    if not overwrite:
        raise NanotuneError(
            f"{target} already exists and is not empty; choose another {what} or pass {flag}"
        )
    real = target.resolve()
    guarded = [(Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home")]
    guarded += [(Path(p).expanduser().resolve(), f"the input {p}") for p in inputs]
    for path, name in guarded:
        if _is_within(path, real):
            raise NanotuneError(
                f"{target}: refusing to overwrite, it holds {name}; choose another {what}"
            )
    meta = read_marker(target)
    if meta is None:
        raise NanotuneError(
            f"{target}: refusing to overwrite a folder nanotune did not write (it has no "
            f"{MARKER} marker); choose another {what}, or empty or delete it yourself"
        )
    foreign = _foreign(target, meta)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise NanotuneError(
            f"{target}: refusing to overwrite, it holds files nanotune did not write ({shown}); "
            f"move them out or choose another {what}"
        )
    return True


def check_file_target(
    target: str | os.PathLike,
    *,
    overwrite: bool,
    ours: Callable[[Path], bool],
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output file",
    flag: str = "--overwrite",
) -> bool:
    """`check_target` for a single file: an existing one needs `overwrite`, must be one nanotune
    wrote (`ours(path)`: the writer knows its own mark) and none of `inputs` (nor inside an input
    folder); True when it already exists."""
    target = _through_link(Path(target).expanduser())
    if target.is_dir():
        raise NanotuneError(f"{target} is a folder; choose a file name for the {what}")
    if not target.exists():
        return False
    if not overwrite:
        raise NanotuneError(f"{target} already exists; choose another {what} or pass {flag}")
    real = target.resolve()
    for p in inputs:
        if _is_within(real, Path(p).expanduser().resolve()):
            raise NanotuneError(
                f"{target}: refusing to overwrite the input {p}; choose another {what}"
            )
    if not target.is_file() or not ours(target):
        raise NanotuneError(
            f"{target}: refusing to overwrite a file nanotune did not write; choose another "
            f"{what}, or move or delete it yourself"
        )
    return True


# --- folders ---------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_in(tmp: Path, directory: Path) -> None:
    """Move the finished `tmp` to `directory`; an old `directory` goes only after that."""
    if not directory.exists():
        os.rename(tmp, directory)
        return
    if _exchange(tmp, directory):
        shutil.rmtree(tmp)  # now the old folder
        return
    # No atomic exchange on this filesystem: the old folder is moved aside for one rename.
    old = directory.parent / f"{_OLD}{os.getpid()}-{directory.name}"
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(directory: Path, kind: str) -> list[Path]:
    """Siblings of `directory` that a writer now gone left: `.tmp-<pid>-<name>-<8 random>`
    folders and files, or `.old-<pid>-<name>` folders. Names are matched exactly, so `run` never
    takes the leftovers of `run-2`. A pid equal to ours is a dead process's (pids are reused, in
    containers pid 1 by every run): this process cleans before it writes."""
    if not directory.parent.is_dir():
        return []
    name = re.escape(directory.name)
    pattern = re.compile(
        rf"^\.tmp-(\d+)-{name}-[a-z0-9_]{{8}}$" if kind == "tmp" else rf"^\.old-(\d+)-{name}$"
    )
    found = []
    for p in directory.parent.iterdir():
        m = pattern.match(p.name)
        if m and (int(m[1]) == os.getpid() or not _alive(int(m[1]))):
            found.append(p)
    return found


def clean_leftovers(directory: Path) -> None:
    """Remove the temporary siblings of `directory` that a killed writer left, and put back an
    old folder that a killed swap had moved aside."""
    directory = _through_link(directory)
    for p in _leftovers(directory, "tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in _leftovers(directory, "old"):
        if not directory.exists():
            os.rename(p, directory)
        else:
            print(f"note: {p} holds an earlier {directory.name} replaced by an interrupted run")


def atomic_dir(
    directory: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    kind: str,
    overwrite: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
    **fixes: str,
) -> Path:
    """Call `write(tmp)` on an empty temporary folder, fsync it, then make it `directory`.

    `kind` names what it is ("checkpoint", "model", "adapter", "classifier") in the marker. An
    existing `directory` is replaced only as `check_target` allows (without `overwrite` it is
    refused); it stays whole until the new folder is complete. A failure of the file system
    is one line (`write_error`; `fixes` are its `what`, `fix_space` and `fix_access`).
    """
    directory = _through_link(Path(directory).expanduser())
    check_target(directory, overwrite=overwrite, inputs=inputs)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-{directory.name}-", dir=directory.parent)
        )
    except OSError as e:
        raise (write_error(e, directory, **fixes) or e) from e
    try:
        write(tmp)
        write_marker(tmp, kind, (p.name for p in tmp.iterdir()))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        _fsync(tmp)
        _swap_in(tmp, directory)
        _fsync(directory.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if clear := write_error(e, directory, **fixes):
            raise clear from e
        raise
    return directory


class RunDir:
    """A run directory that `--overwrite` replaces without losing the old run to a failure.

    `open()` creates the folder (moving an existing nanotune run aside), `close(keep_new)` ends
    the attempt: with `keep_new` the old run is deleted, else this attempt's folder is removed and
    the old run put back. A new run is kept once it has anything to resume from.
    """

    def __init__(self, path: str | os.PathLike, owns: Iterable[str]):
        self.path = _through_link(Path(path).expanduser())
        self.owns = list(owns)
        self.previous: Path | None = None
        self.created = False

    def open(self, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
        exists = check_target(self.path, overwrite=overwrite, inputs=inputs, what="output_dir")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if exists:
                previous = self.path.parent / f"{_OLD}{os.getpid()}-{self.path.name}"
                os.rename(self.path, previous)
                self.previous = previous
            self.created = not self.path.exists()
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            self.close(keep_new=False)
            raise (write_error(e, self.path) or e) from e
        write_marker(self.path, "run", self.owns)
        return self.path

    def close(self, *, keep_new: bool) -> None:
        if keep_new:
            if self.previous is not None:
                shutil.rmtree(self.previous, ignore_errors=True)
        else:
            if self.created:
                shutil.rmtree(self.path, ignore_errors=True)
            elif self.path.is_dir():  # an empty folder the user made: empty again
                for name in [*self.owns, MARKER]:
                    entry = self.path / name
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            if self.previous is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                os.rename(self.previous, self.path)
        self.previous = None

"""File I/O the whole app shares: atomic writes, advisory locks, leftover-temp cleanup.

Every file counterseg writes goes through here: a temporary sibling is written, fsynced and renamed
over the final name, so a crash or a full disk never leaves a half-written file under a final name,
and errors become the BIDS-App exit codes 73 (cannot create) and 74 (I/O failure). This module
imports nothing of the app but its errors and the test kill points.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_app import killpoints
from bids_app.errors import CannotCreateError, OutputIOError

logger = logging.getLogger(__name__)

_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
_MISSING_DIR_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def _temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """Hidden, unique sibling of ``path``: same filesystem for os.replace, ignored by BIDS tools."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


#: What ``_temp_path`` makes: ``.<final name>.<pid>.<8 hex>.tmp[.nii[.gz]]``.
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?P<ext>\.nii(?:\.gz)?)?$")


def temp_file_target(name: str) -> str | None:
    """The final file name a temporary file of ours was for, or None for any other file."""
    match = _TEMP_RE.match(name)
    return None if match is None else match["final"] + (match["ext"] or "")


def temp_file_owner(name: str) -> int | None:
    """The process id that wrote a temporary file of ours, or None for any other file."""
    match = _TEMP_RE.match(name)
    return None if match is None else int(match["pid"])


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (it may be another program that reused the id)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftover_temp_files(directory: str | Path, finals: Iterable[str] | None = None,
                               recursive: bool = False, keep_live_owners: bool = False) -> list[Path]:
    """Remove temporary files a killed process left behind (SIGKILL runs no cleanup).

    Only a process that owns the targets may call this: the group level for its model and
    checkpoint folders, the participant level for the outputs of an image whose lock it holds (so
    every temporary file of that image is proven abandoned). ``finals`` limits the sweep to
    temporary files of those final names. ``keep_live_owners`` (no lock to prove ownership) keeps
    the files whose writer's process id is alive on this host: a live job's file is never removed,
    at the price of keeping a dead job's file whose id was reused.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = set(finals) if finals is not None else None
    removed = []
    for path in directory.rglob(".*") if recursive else directory.glob(".*"):
        target = temp_file_target(path.name)
        if target is None or (wanted is not None and target not in wanted) or not path.is_file():
            continue
        owner = temp_file_owner(path.name)
        if keep_live_owners and owner is not None and process_alive(owner):
            continue
        _remove_quietly(path)
        removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), directory)
    return removed


def _error(path: Path, exc: OSError, creating: bool) -> Exception:
    """Map an OSError to the exit-code exception: cannot create (73) vs I/O failure (74)."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    detail = f"{reason} [{code}]" if code else reason
    if exc.errno in _PERMISSION_ERRNOS or (creating and exc.errno in _MISSING_DIR_ERRNOS):
        return CannotCreateError(f"cannot create {path}: {detail}")
    return OutputIOError(f"writing {path} failed: {detail}")


def ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateError(
            f"cannot create directory {path.parent}: {exc.strerror or exc}"
        ) from exc


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.warning("could not remove temporary file %s", path)


@contextlib.contextmanager
def _discard_on_failure(tmp: Path, path: Path, creating: bool = False) -> Iterator[None]:
    """Remove the temporary file when the block fails; an OSError becomes exit 74 (I/O failure), or
    73 when the block was ``creating`` it and could not (:func:`_error`)."""
    try:
        yield
    except OSError as exc:
        created = tmp.exists()
        _remove_quietly(tmp)
        raise _error(path, exc, creating=creating and not created) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    """Persist the rename; best effort, as some filesystems refuse fsync on directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it over ``path``; on failure remove it and raise 73/74."""
    with _discard_on_failure(tmp, path):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` so that ``path`` either keeps its old content or has all of the new."""
    path = Path(path)
    ensure_parent(path)
    tmp = _temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    except OSError as exc:
        raise _error(path, exc, creating=True) from exc
    with _discard_on_failure(tmp, path), os.fdopen(fd, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        killpoints.reached(f"write:{path.parent.name}/{path.name}")  # test hook: die with a half-written temp
        fh.write(data[half:])
        fh.flush()
    _commit(tmp, path)
    logger.debug("wrote %s", path)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Atomic text write (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_bytes(obj: Any) -> bytes:
    """Stable serialisation, so identical content gives identical bytes (idempotent rewrites)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON write, 2-space indented with a trailing newline."""
    return atomic_write_bytes(path, json_bytes(obj))


def save_nifti_atomic(img: Any, path: str | Path) -> Path:
    """Save a nibabel image atomically (nibabel's gzip has mtime 0: reproducible bytes)."""
    import nibabel as nib

    path = Path(path)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii" if path.suffix == ".nii" else ""
    if not ext:
        raise ValueError(f"NIfTI output must end in .nii.gz or .nii: {path}")
    ensure_parent(path)
    # nibabel picks format and compression from the name, so the temp name keeps the extension.
    tmp = _temp_path(path.with_name(path.name[: -len(ext)]), suffix=f".tmp{ext}")
    with _discard_on_failure(tmp, path, creating=True):
        nib.save(img, tmp)
        killpoints.reached(f"write:{path.parent.name}/{path.name}")  # test hook: complete temp, no final file
    _commit(tmp, path)
    logger.debug("wrote %s", path)
    return path


def read_or_none(path: Path) -> bytes | None:
    """Current content of ``path``, None when absent or unreadable (then we just rewrite it)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if needed, never removed) for a read-then-write of a
    file that summarises what several concurrent jobs wrote (the summary table, the group report).

    Atomic writes alone make such a file whole but let a job that read the outputs before another job
    finished overwrite the other's later, fuller version; the lock orders the read-then-write steps so
    the last one sees every finished output. Where the filesystem has no ``flock`` (some network
    filesystems), the write goes ahead unlocked: still atomic, at worst one image short until the next run.
    """
    import fcntl

    with _lock_file(path) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.debug("no lock on %s (%s): continuing unlocked", path, exc.strerror or exc)
        yield


@contextlib.contextmanager
def _lock_file(path: str | Path) -> Iterator[int]:
    """The open descriptor of a lock file (created with its folder if needed, never removed: removing
    a lock file races with a process opening it); closing it releases any lock taken on it."""
    path = Path(path)
    ensure_parent(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _error(path, exc, creating=True) from exc
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LockAttempt:
    """How a non-blocking lock attempt went: ``held`` by this process, or ``busy``: another live
    process holds it (``holder``: the process id it recorded, None when not yet written). Neither
    where the filesystem has no ``flock`` (some network filesystems): the caller goes ahead unproven."""

    held: bool
    busy: bool = False
    holder: int | None = None


@contextlib.contextmanager
def try_exclusive_lock(path: str | Path) -> Iterator[LockAttempt]:
    """Try once, without waiting, to take the advisory lock on ``path`` for as long as the block runs.

    The holder writes its process id into the file for the message of the one that finds it busy.
    ``flock`` belongs to the open file, so the kernel releases it when the holder dies, however it
    dies: a lock nobody holds proves that whoever took it before has finished or is dead.
    """
    with _lock_file(path) as fd:
        yield _take(fd, Path(path))


_UNLOCKABLE: set[Path] = set()  # folders whose filesystem refused flock (warned about once)


def _take(fd: int, path: Path) -> LockAttempt:
    """One non-blocking ``flock`` on ``fd``; on success record this process's id in the file."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return LockAttempt(held=False, busy=True, holder=_recorded_pid(fd))
        if path.parent not in _UNLOCKABLE:  # once per folder, not once per image
            _UNLOCKABLE.add(path.parent)
            logger.warning("no lock on %s (%s): concurrent jobs on one image are not detected on this filesystem",
                           path, exc.strerror or exc)
        return LockAttempt(held=False)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # the id is for a message only
        pass
    return LockAttempt(held=True)


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None

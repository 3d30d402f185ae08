"""Atomic writes: a reader sees either the old file/directory or the complete new one, never half of it.

Temporaries live beside their target, named after it and the writing process: ``.<name>.<pid>-<random><suffix>.tmp``
(:func:`atomic_path`, :func:`atomic_dir`) and ``.<name>.old-<pid>`` (the directory :func:`atomic_dir` is replacing).
A writer killed with ``kill -9`` cannot remove its own, so :func:`remove_stale_temporaries` removes them on the next
run: every :func:`atomic_dir` for its parent, and every workspace stage run for its directories. The rule: a temporary
whose pid is not a running process is stale; one of a live process (a concurrent writer) is never touched. A stale
``.old-<pid>`` directory whose target is missing (killed between the two renames) is renamed back, as the only copy
of the previous result. Names without a pid (written by earlier versions) are stale once unmodified for an hour, and
are removed only where the caller says no other writer uses such names (the workspace stage directories). Pids are
this host's: the rule assumes writers on one machine, not several sharing a network directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_OURS = re.compile(r"\.(?P<name>.+?)\.(?:(?P<pid>\d+)-[a-z0-9_]{8}(?:\.[^.]*)?\.tmp|old-(?P<old>\d+))")
_LEGACY = re.compile(r"\.(?P<name>.+?)\.[a-z0-9_]{8}(?:\.[^.]*)?\.tmp")
LEGACY_AGE_S = 3600.0
"""Age after which a temporary without a pid (an earlier version's) counts as stale, where the caller allows it."""


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_stale(entry: os.DirEntry[str], legacy_age_s: float | None) -> tuple[bool, str | None]:
    """(stale by the module's rule, the target's name when ``entry`` is a replaced ``.old-<pid>`` directory)."""
    m = _OURS.fullmatch(entry.name)
    if m:
        return not _pid_alive(int(m["pid"] or m["old"])), m["name"] if m["old"] else None
    if legacy_age_s is not None and _LEGACY.fullmatch(entry.name):
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > legacy_age_s, None
    return False, None


def remove_stale_temporaries(directory: str | Path, *, legacy_age_s: float | None = None) -> list[Path]:
    """Remove the temporaries in ``directory`` that killed writers left (the rule: module docstring); return them.

    ``legacy_age_s`` also removes pid-less names older than that: only where no live writer uses such names.
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        try:
            stale, old_of = _is_stale(entry, legacy_age_s)
            if not stale:
                continue
            target = Path(directory) / old_of if old_of else None
            if target is not None and not target.exists():
                os.replace(entry.path, target)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # its writer finished or another run removed it meanwhile
            continue
        removed.append(Path(entry.path))
    return removed


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A fresh temporary file beside ``path`` with ordinary permissions (mkstemp makes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=f"{suffix}.tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it into place at the end.

    The previous directory (if any) is kept until the new one is complete, so an interrupted
    run leaves the old result intact and no half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(directory: str | Path) -> None:
    """Prove a file can be written in ``directory`` (or in its nearest existing ancestor, which would hold it) without
    creating anything; else a user error naming it."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise DataError(f"{directory}: expected a writable output directory ({exc.strerror}: {exc.filename})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def tree_listing(directory: Path) -> tuple[list[tuple[str, int, int]], float]:
    """(every file's (relative path, size, mtime_ns) in a stable order, newest mtime): a directory's identity
    without reading its data (the store keys a folder source by it, the nightly inbox its entries)."""
    listing, newest = [], Path(directory).stat().st_mtime
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            listing.append((os.path.relpath(os.path.join(dirpath, name), directory), st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime)
    return listing, newest

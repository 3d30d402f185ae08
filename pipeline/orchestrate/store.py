"""One content-addressed artifact store for the CLI, ``dvc repro`` and the flows.

A stage's key hashes the config keys it reads (``graph.Stage.params``), the code it runs (the import
closure of its module), the keys of its upstream stages and, for file sources, the source's identity.
So a key names the stage's whole history: changing ``train.lr`` changes train, calibrate and evaluate,
editing ``pipeline/data/shards.py`` changes shard and everything after it.

Two kinds of directory carry a completion record with the key:

* the store, ``<schedule.cache_root>/<stage>/<key>/``, where the flows build (under a temporary name,
  renamed into place after the record is written, so a crash never leaves a directory that looks done);
* the workspace directory of a stage run by the CLI or DVC (``data/...``), whose record sits beside the
  files in ``.astroflow-stage.json`` with each file's size, modification time and SHA-256 (a file whose
  mtime moved still counts when its bytes are the same: DVC replaces cached file outputs by copies).

Either side reuses the other by hard links, never copies: a flow adopts a workspace directory whose
record has the key it needs and whose files are unchanged, and the CLI checks a stored directory out
into the workspace instead of recomputing it. Stage outputs are always replaced by rename, never
written in place, so a file shared by links cannot change under the other side.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, stable_hash
from pipeline.io import atomic_dir, atomic_write_json, sha256_file, tree_listing
from pipeline.layout import Layout
from pipeline.orchestrate.graph import GRAPH, stored_stages
from pipeline.orchestrate.imports import code_digest

STORE_VERSION = 2
MARKER = "_complete.json"
WORKSPACE_MARKER = ".astroflow-stage.json"

log = logging.getLogger("astroflow.store")


# ------------------------------------------------------------------ keys


def path_identity(path: Path) -> dict[str, Any]:
    """Path, size and mtime of a file, or a hash of every file's (relative path, size, mtime) under a directory."""
    path = Path(path).resolve()
    if path.is_dir():
        listing, _ = tree_listing(path)
        return {"path": str(path), "kind": "dir", "files": len(listing), "listing": stable_hash(listing)}
    if path.is_file():
        st = path.stat()
        return {"path": str(path), "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": str(path), "missing": True}


def source_identity(cfg: Config, layout: Layout) -> dict[str, Any] | None:
    """What the config cannot say about the input: a local file's or directory's size and mtimes.

    The synthetic source is fully described by its config and galaxy10 by its pinned SHA256, so only
    ``h5`` and ``folder`` sources add an identity to the prepare key.
    """
    if cfg.data.source not in ("h5", "folder") or not cfg.data.path:
        return None
    return path_identity(layout.resolve(cfg.data.path))


def stage_key(stage: str, cfg: Config, upstream: Mapping[str, str], extra: Any = None) -> str:
    """``stable_hash`` of the stage's config keys, its code, its upstream keys and any extra identity."""
    spec = GRAPH[stage]
    missing = set(spec.upstream) - set(upstream)
    if missing:
        raise ValueError(f"stage {stage!r} needs the keys of {sorted(missing)}")
    return stable_hash(
        {
            "version": STORE_VERSION,
            "stage": stage,
            "config": cfg.section_hash(*spec.params),
            "code": code_digest(spec.module),
            "upstream": {name: upstream[name] for name in spec.upstream},
            "extra": extra,
        }
    )


def _extra(stage: str, cfg: Config, layout: Layout) -> Any:
    return source_identity(cfg, layout) if stage == "prepare" else None


def plan_keys(cfg: Config, layout: Layout) -> dict[str, str]:
    """Every stored stage's key, in graph order, before anything runs."""
    keys: dict[str, str] = {}
    for spec in stored_stages():
        keys[spec.name] = stage_key(spec.name, cfg, keys, _extra(spec.name, cfg, layout))
    return keys


def workspace_key(stage: str, cfg: Config, layout: Layout) -> str | None:
    """The key of a workspace run of ``stage``: upstream keys from the records of what is on disk.

    None when an upstream directory has no valid record (built by hand, or by an older astroflow):
    the stage then runs as usual but its output is not shared with the store.
    """
    upstream = {}
    for name in GRAPH[stage].upstream:
        record = workspace_record(layout.stage_dir(name))
        if record is None:
            return None
        upstream[name] = record["key"]
    return stage_key(stage, cfg, upstream, _extra(stage, cfg, layout))


# ------------------------------------------------------------------ records


def _listing(directory: Path) -> dict[str, list[int]]:
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in (MARKER, WORKSPACE_MARKER):
            st = path.stat()
            out[path.relative_to(directory).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _record(
    stage: str, key: str, summary: Mapping[str, Any], seconds: float, directory: Path, *, digests: bool
) -> dict[str, Any]:
    """The completion record. ``digests`` (SHA-256 per file) only for workspace directories, which DVC may re-copy:
    store directories are never rewritten, so hashing their bytes would read every file a second time for nothing."""
    files = _listing(directory)
    record: dict[str, Any] = {
        "stage": stage,
        "key": key,
        "token": uuid.uuid4().hex,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "seconds": round(seconds, 3),
        "summary": dict(summary),
        "files": files,
    }
    if digests:
        record["sha256"] = {rel: sha256_file(directory / rel) for rel in files}
    return json.loads(json.dumps(record, default=str))


def _unchanged(directory: Path, record: dict[str, Any]) -> bool:
    """Same names and sizes, and same bytes where the mtime moved (DVC re-copies file outputs it caches)."""
    now, then = _listing(directory), record.get("files") or {}
    if {k: v[0] for k, v in now.items()} != {k: v[0] for k, v in then.items()}:
        return False
    moved = [rel for rel in now if now[rel] != then[rel]]
    return all(sha256_file(directory / rel) == record.get("sha256", {}).get(rel) for rel in moved)


def workspace_record(directory: Path) -> dict[str, Any] | None:
    """The record of a workspace stage directory, or None when missing or when its files changed since."""
    try:
        record = json.loads((Path(directory) / WORKSPACE_MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return record if _unchanged(Path(directory), record) else None


def write_workspace_record(directory: Path, stage: str, key: str, summary: Mapping[str, Any], seconds: float) -> None:
    atomic_write_json(Path(directory) / WORKSPACE_MARKER, _record(stage, key, summary, seconds, Path(directory), digests=True))


# ------------------------------------------------------------------ the store


@dataclass(frozen=True)
class StageDir:
    """Where one stage's artifacts for one key live (or will live) in the store."""

    root: Path
    stage: str
    key: str

    @property
    def path(self) -> Path:
        return Path(self.root) / self.stage / self.key

    def complete(self) -> dict[str, Any] | None:
        """The completion record, or None while the directory is missing or unfinished."""
        try:
            return json.loads((self.path / MARKER).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def prefect_key(self) -> str | None:
        """Prefect's cache key: ours plus the record's token, so a rebuilt directory never matches an old record."""
        record = self.complete()
        return None if record is None else f"astroflow-{self.stage}-{self.key}-{record['token']}"


@contextmanager
def _key_lock(where: StageDir) -> Iterator[None]:
    """One builder per key: a concurrent run with the same parameters waits, then reuses."""
    import fcntl

    lock = Path(where.root) / where.stage / f".{where.key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = (MARKER, WORKSPACE_MARKER)) -> None:
    """Hard-link every file of ``src`` into the empty directory ``dst`` (same layout, no bytes copied)."""
    for path in sorted(Path(src).rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif path.name not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dst / rel)


def build(
    where: StageDir,
    make: Callable[[Path], Mapping[str, Any]],
    *,
    adopt_from: Path | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """(record, how): reuse ``where`` ("hit"), link ``adopt_from`` in ("adopted"), or ``make(tmp)`` ("built").

    ``adopt_from`` is a workspace directory whose record has this key and whose files are unchanged.
    """
    logger = logger or log
    with _key_lock(where):
        record = where.complete()
        if record is not None:
            logger.info("cache hit %s %s", where.stage, where.key)
            return record, "hit"
        parent = where.path.parent
        for stale in parent.glob(f".{where.key}.*.tmp"):  # left by a killed run; we hold the key lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{where.key}.", suffix=".tmp", dir=parent))
        try:
            t0 = time.perf_counter()
            adopted = _adopt(adopt_from, where, tmp) if adopt_from is not None else None
            if adopted is not None:
                summary = adopted["summary"]
                logger.info("reusing %s %s from %s (hard links)", where.stage, where.key, adopt_from)
            else:
                logger.info("cache miss %s %s: building in %s", where.stage, where.key, where.path)
                summary = dict(make(tmp))
            record = _record(where.stage, where.key, summary, time.perf_counter() - t0, tmp, digests=False)
            atomic_write_json(tmp / MARKER, record)  # fsynced: the record is the commit point
            if where.path.exists():  # an unfinished directory someone made by hand: ours replaces it
                shutil.rmtree(where.path)
            os.rename(tmp, where.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return record, "built" if adopted is None else "adopted"


def _adopt(directory: Path, where: StageDir, tmp: Path) -> dict[str, Any] | None:
    """Link ``directory`` into ``tmp`` when its record has ``where``'s key and its files are unchanged; its record."""
    record = workspace_record(directory)
    if record is None or record.get("key") != where.key:
        return None
    link_tree(directory, tmp)
    return record


def check_out(where: StageDir, directory: Path) -> dict[str, Any]:
    """Replace the workspace ``directory`` with hard links to the stored one, and record it there too."""
    record = where.complete()
    if record is None:
        raise FileNotFoundError(where.path)
    with atomic_dir(directory) as tmp:
        link_tree(where.path, tmp)
        write_workspace_record(tmp, where.stage, where.key, record["summary"], 0.0)
    return record


def stage_dirs(root: Path, keys: Mapping[str, str]) -> dict[str, StageDir]:
    return {stage: StageDir(Path(root), stage, key) for stage, key in keys.items()}


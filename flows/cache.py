"""Content-addressed stage directories: the flows' artifact cache.

Each stage writes into ``cache_root/<stage>/<key>/`` where ``key`` hashes the config sections the
stage reads and the keys of the stages it reads from, so a key names its whole upstream history:
changing ``train.lr`` changes the train, calibrate and evaluate keys and leaves prepare, validate and
shard alone, while changing ``split.seed`` changes shard and everything after it. Keys depend on the
config (and, for file sources, the source file's identity) only, so every key of a run is known before
any stage runs.

A directory counts only once ``_complete.json`` is in it; the stage builds it under a temporary name
and renames it into place after writing that marker, so a crash never leaves a half-built directory
that looks complete. The directories, not Prefect's result records, are the ground truth: a fresh
Prefect server with an empty database still gets every cache hit.
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
from pipeline.io import atomic_write_json
from pipeline.layout import Layout

CACHE_VERSION = 1
MARKER = "_complete.json"

STAGES: tuple[str, ...] = ("prepare", "validate", "shard", "train", "calibrate", "evaluate")

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "validate": ("validate",),
    "shard": ("split", "shard"),
    "train": ("model", "train"),
    "calibrate": ("calibrate", "evaluate"),
    "evaluate": ("evaluate", "calibrate"),
}
"""Config sections each stage reads itself; what it reads through its inputs is in the upstream keys."""

STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "validate": ("prepare",),
    "shard": ("prepare", "validate"),
    "train": ("shard",),
    "calibrate": ("shard", "train"),
    "evaluate": ("shard", "train", "calibrate"),
}

log = logging.getLogger("astroflow.cache")


def source_identity(cfg: Config, layout: Layout) -> dict[str, Any] | None:
    """What the config cannot say about the input: a local file's or directory's size and mtimes.

    The synthetic source is fully described by its config and galaxy10 by its pinned SHA256, so only
    ``h5`` and ``folder`` sources add an identity to the prepare key.
    """
    if cfg.data.source not in ("h5", "folder") or not cfg.data.path:
        return None
    return path_identity(layout.resolve(cfg.data.path))


def path_identity(path: Path) -> dict[str, Any]:
    """Path, size and mtime of a file, or a hash of every file's (relative path, size, mtime) under a directory."""
    path = Path(path).resolve()
    if path.is_dir():
        listing = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                listing.append((os.path.relpath(os.path.join(dirpath, name), path), st.st_size, st.st_mtime_ns))
        return {"path": str(path), "kind": "dir", "files": len(listing), "listing": stable_hash(listing)}
    if path.is_file():
        st = path.stat()
        return {"path": str(path), "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"path": str(path), "missing": True}


def stage_key(stage: str, cfg: Config, upstream: Mapping[str, str], extra: Any = None) -> str:
    """``stable_hash`` of the stage's own config sections, its upstream keys and any extra identity."""
    missing = set(STAGE_UPSTREAM[stage]) - set(upstream)
    if missing:
        raise ValueError(f"stage {stage!r} needs the keys of {sorted(missing)}")
    return stable_hash(
        {
            "version": CACHE_VERSION,
            "stage": stage,
            "config": cfg.section_hash(*STAGE_SECTIONS[stage]),
            "upstream": {name: upstream[name] for name in STAGE_UPSTREAM[stage]},
            "extra": extra,
        }
    )


def plan_keys(cfg: Config, layout: Layout) -> dict[str, str]:
    """Every stage's key, in stage order, before anything runs."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        extra = source_identity(cfg, layout) if stage == "prepare" else None
        keys[stage] = stage_key(stage, cfg, keys, extra)
    return keys


@dataclass(frozen=True)
class StageDir:
    """Where one stage's artifacts for one key live (or will live)."""

    root: Path
    stage: str
    key: str

    @property
    def path(self) -> Path:
        return Path(self.root) / self.stage / self.key

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def complete(self) -> dict[str, Any] | None:
        """The completion record, or None while the directory is missing or unfinished."""
        try:
            return json.loads(self.marker.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def prefect_key(self) -> str | None:
        """Prefect's cache key: ours plus the marker's token, so a rebuilt directory never matches an old record."""
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


def run_stage(
    where: StageDir,
    build: Callable[[Path], Mapping[str, Any]],
    *,
    inputs: Mapping[str, Any] | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    announce: bool = True,
) -> tuple[dict[str, Any], bool]:
    """(completion record, hit): reuse ``where`` if complete, else ``build(tmp_dir)`` and rename it into place.

    ``build`` writes the stage's artifacts into the empty directory it is given and returns a JSON-able
    summary, stored in the marker so a hit returns it without reading the artifacts. Prefect tasks
    announce hits and misses in their cache-key function (which runs even when Prefect's own cache
    skips the task), so they pass ``announce=False`` to log each once.
    """
    logger = logger or log
    record = where.complete()
    if record is not None:
        if announce:
            logger.info("cache hit %s %s", where.stage, where.key)
        return record, True
    with _key_lock(where):
        record = where.complete()
        if record is not None:
            logger.info("cache hit %s %s (built by a concurrent run)", where.stage, where.key)
            return record, True
        if announce:
            logger.info("cache miss %s %s", where.stage, where.key)
        logger.info("building %s %s in %s", where.stage, where.key, where.path)
        parent = where.path.parent
        for stale in parent.glob(f".{where.key}.*.tmp"):  # left by a killed run; we hold the key lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{where.key}.", suffix=".tmp", dir=parent))
        try:
            t0 = time.perf_counter()
            summary = dict(build(tmp))
            record = {
                "stage": where.stage,
                "key": where.key,
                "token": uuid.uuid4().hex,
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
                "seconds": round(time.perf_counter() - t0, 3),
                "inputs": dict(inputs or {}),
                "summary": summary,
            }
            atomic_write_json(tmp / MARKER, record)  # fsynced: the marker is the commit point
            if where.path.exists():  # an unfinished directory someone made by hand: ours replaces it
                shutil.rmtree(where.path)
            os.rename(tmp, where.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("stored %s %s in %.1fs", where.stage, where.key, record["seconds"])
        return json.loads(json.dumps(record, default=str)), False

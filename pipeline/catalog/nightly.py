"""The nightly catalog: classify what arrived in the inbox with the production model, without Prefect.

Each top-level entry of ``schedule.inbox`` (a Galaxy10-schema HDF5 file, a shard directory or
``.tar``, a folder of cutouts, a Zoobot CSV/Parquet catalog) is one input, identified by its name,
size and mtime (for a directory: every file's). Inputs whose identity is not yet in
``<schedule.catalog>/inbox_state.json`` are new. Each new input is planned (``pipeline.catalog.predict.plan_run``:
its run and chunks, no model run), then every chunk not yet committed is submitted on its own
(``predict(..., chunks=[i])``), so an executor that spreads work (Prefect on Dask) spreads even one
large input; when all of an input's chunks succeeded, ``finalize_run`` writes its run summary and the
input is recorded as processed. That fan-out is :func:`pipeline.catalog.distributed.classify_inputs`, the
one ``astroflow predict --dask`` uses too. ``predict`` is idempotent per (input chunk, model), so a failed or
killed run is simply run again: it redoes the chunks that are missing and adds no duplicate rows.

The catalog root is ``schedule.catalog``, never ``data/catalog``: the DVC ``predict`` stage owns that
one, and ``dvc status`` stays clean after a nightly run. An ``flock`` on ``<catalog>/.nightly.lock``
keeps two runs apart, whoever started them (``astroflow nightly``, the Prefect flow, cron).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.catalog.distributed import Job, Submit, classify_inputs, run_inline
from pipeline.score import registry as reg
from pipeline.config import Config, stable_hash
from pipeline.errors import AstroflowError, DataError
from pipeline.catalog.inputs import detect_kind
from pipeline.io import atomic_write_json, read_json, tree_listing
from pipeline.layout import Layout

STATE_FILE = "inbox_state.json"
LOCK_FILE = ".nightly.lock"
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".lock")
"""Names of uploads in progress, never inputs."""
RESULT_KEYS = (
    "run_id", "model_id", "status", "num_written", "num_predicted", "num_errors", "num_coords_out_of_range", "num_chunks",
    "num_skipped_chunks", "class_counts",
)

log = logging.getLogger(__name__)


class NightlyBusy(AstroflowError):
    """Another nightly run kept the catalog locked for longer than ``schedule.lock_timeout_s``."""


# ------------------------------------------------------------------ inbox


@dataclass(frozen=True)
class InboxEntry:
    """One candidate input: its name in the inbox, its identity and when it last changed."""

    name: str
    path: str
    identity: dict[str, Any]
    newest_mtime: float

    @property
    def key(self) -> str:
        return stable_hash(self.identity)


def inbox_entry(path: Path, inbox: Path) -> InboxEntry:
    """Identity = name, size and mtime (a directory: a hash over every file's), computed without reading data."""
    name = path.relative_to(inbox).as_posix()
    if path.is_dir():
        listing, newest = tree_listing(path)
        identity = {"name": name, "kind": "dir", "files": len(listing), "listing": stable_hash(listing)}
        return InboxEntry(name, str(path.resolve()), identity, newest)
    st = path.stat()
    identity = {"name": name, "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return InboxEntry(name, str(path.resolve()), identity, st.st_mtime)


def scan_inbox(
    inbox: Path, processed: dict[str, Any], settle_s: float, *, now: float | None = None
) -> tuple[list[InboxEntry], list[dict[str, str]]]:
    """(new inputs, entries skipped with the reason): everything at the inbox's top level not yet processed."""
    now = time.time() if now is None else now
    new: list[InboxEntry] = []
    skipped: list[dict[str, str]] = []
    if not inbox.is_dir():
        return new, skipped
    for path in sorted(inbox.iterdir()):
        if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIXES):
            continue
        try:
            detect_kind(path)
            entry = inbox_entry(path, inbox)
        except (DataError, OSError) as exc:
            skipped.append({"input": path.name, "reason": f"not an input: {exc}"})
            continue
        if entry.key in processed:
            continue
        age = now - entry.newest_mtime
        if age < settle_s:
            skipped.append({"input": entry.name, "reason": f"changed {age:.0f}s ago (< schedule.inbox_settle_s); next run"})
            continue
        new.append(entry)
    return new, skipped


def load_state(catalog_root: Path) -> dict[str, Any]:
    """The inputs already processed into this catalog, by identity key."""
    path = catalog_root / STATE_FILE
    return read_json(path) if path.is_file() else {"version": 1, "inputs": {}}


def save_state(catalog_root: Path, state: dict[str, Any]) -> None:
    atomic_write_json(catalog_root / STATE_FILE, state)


@contextmanager
def catalog_lock(catalog_root: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive ``flock`` on the catalog's nightly lock file, waiting up to ``timeout_s``; the OS drops it on a crash."""
    import fcntl

    catalog_root.mkdir(parents=True, exist_ok=True)
    path = catalog_root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise NightlyBusy(f"{path}: another nightly run has held the lock for over {timeout_s:g}s") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ executors


@contextmanager
def local_executor(workers: int = 1) -> Iterator[Submit]:
    """Inline with one worker (each chunk already uses every core), else a thread pool of ``workers``."""
    if workers <= 1:
        yield run_inline
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nightly") as pool:
        yield lambda fn, *args, name: pool.submit(fn, *args)


def production_job(cfg: Config, layout: Layout) -> Job:
    """The job for the registry's production model; ``RegistryError`` when nothing was promoted yet."""
    root = layout.resolve(cfg.registry.root)
    prod = reg.production_dir(root)
    if prod is None:
        raise reg.RegistryError(f"{root}: no production model; train and promote one first")
    calibration = prod / reg.CALIBRATION_FILE
    return Job(cfg, prod / reg.MODEL_FILE, calibration if calibration.is_file() else None, layout.resolve(cfg.schedule.catalog))


# ------------------------------------------------------------------ one run


@dataclass
class _Ledger:
    """The run's bookkeeping: the state file, kept current after every input, and what succeeded or failed."""

    catalog: Path
    state: dict[str, Any]
    logger: logging.Logger | logging.LoggerAdapter[Any]
    flow_run_id: str | None = None
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fail(self, entry: InboxEntry, what: str, exc: BaseException) -> None:
        """Keep the first failure of an input; it stays unrecorded, so the next run retries it."""
        self.logger.error("input %s failed (%s): %s", entry.name, what, exc)
        self.failed.setdefault(entry.key, {"input": entry.name, "error": f"{what}: {type(exc).__name__}: {exc}"[:500]})

    def record(self, entry: InboxEntry, summary: dict[str, Any]) -> None:
        """Mark a finalized input processed; the state file is saved at once, so a killed run keeps it."""
        result = {k: summary.get(k) for k in RESULT_KEYS}
        self.logger.info(
            "%s: run %s %s, %d rows written now, %d classified in total, %d failed",
            entry.name, result["run_id"], result["status"], result["num_written"], result["num_predicted"], result["num_errors"],
        )
        processed_at = dt.datetime.now(dt.UTC).isoformat()
        self.state["inputs"][entry.key] = {**entry.identity, **result, "processed_at": processed_at, "flow_run_id": self.flow_run_id}
        save_state(self.catalog, self.state)
        self.done.append({"input": entry.name, **result})


def catalog_rows(catalog_root: Path) -> int:
    """Rows in the catalog's predictions table (0 before the first run)."""
    from pipeline.catalog.parquet import PREDICTIONS, predictions_dataset

    if not (catalog_root / PREDICTIONS).is_dir():
        return 0
    return int(predictions_dataset(catalog_root).count_rows())


def classify_new(
    job: Job,
    inbox: Path,
    submit: Submit,
    *,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """Classify the inbox's new inputs into ``job.catalog``; the caller holds the catalog lock.

    Returns the run's summary; ``failed`` lists the inputs left for the next run.
    """
    ledger = _Ledger(job.catalog, load_state(job.catalog), logger, flow_run_id)
    new, skipped = scan_inbox(inbox, ledger.state["inputs"], job.cfg.schedule.inbox_settle_s)
    logger.info("production model %s; inbox %s: %d new input(s), %d skipped", job.model_id, inbox, len(new), len(skipped))
    classify_inputs(job, new, submit, ledger)
    return {
        "model_id": job.model_id,
        "inbox": str(inbox),
        "catalog": str(job.catalog),
        "new_inputs": len(new),
        "classified": sorted(ledger.done, key=lambda r: r["input"]),
        "failed": sorted(ledger.failed.values(), key=lambda r: r["input"]),
        "skipped": skipped,
        "rows_written": sum(int(r["num_written"]) for r in ledger.done),
        "catalog_rows": catalog_rows(job.catalog),
    }


def run_nightly(
    cfg: Config,
    layout: Layout,
    submit: Submit = run_inline,
    *,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """One nightly run: what ``astroflow nightly`` and the ``nightly-catalog`` flow both call.

    The production model is looked up first, so a registry without one fails before anything is written;
    the run then waits for the catalog lock (``schedule.lock_timeout_s``).
    """
    job = production_job(cfg, layout)
    with catalog_lock(job.catalog, cfg.schedule.lock_timeout_s):
        return classify_new(job, layout.resolve(cfg.schedule.inbox), submit, logger=logger, flow_run_id=flow_run_id)

"""The Parquet catalog ``predict`` writes: schema, run partitions, completion records, errors table.

Layout under the catalog root (``docs/catalog.md``)::

    catalog.json                                  schema version and class names (fixed per root)
    predictions/run=<run_id>/part-<chunk>.parquet one file per committed chunk
    errors/run=<run_id>/part-<chunk>.parquet      images that could not be classified
    runs/<run_id>/run.json                        what the run is: model, input, settings, start time
    runs/<run_id>/chunks/<chunk>.json             completion record of each committed chunk
    runs/<run_id>/summary.json                    counts of the whole run, rewritten at each finish
    runs/<run_id>/{predictions,errors}/           the chunks of a run still in progress (not yet visible)

A run's rows become visible only when the run is complete: chunks are committed into the run's own
directory, and :meth:`Run.mark_complete` moves them into the ``run=<run_id>`` partitions (one rename per
table) before writing ``complete.json``. A killed run that is never resumed (its input changed, say)
therefore leaves no rows in ``predictions/``; every reader of the dataset sees whole runs only.

A chunk is committed by writing its Parquet files (each atomically, under a name fixed by the chunk
index) and then its completion record: a chunk without a record is redone and its files replaced, so
a killed run never leaves duplicate rows. File names fixed per chunk, not per attempt, are what
makes that true even when the kill lands between the data and the record.

A run is written either by one process holding its lock throughout (:meth:`Catalog.open_run`) or by
several workers that each write some of its chunks (:meth:`Catalog.join_run`) and take the lock only
to create the run and for each commit. Either way temporary files exist only under the lock, so
whoever holds it may delete any it finds: they were left by a killed writer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import GALAXY10_CLASS_NAMES
from pipeline.errors import DataError
from pipeline.io import atomic_path, atomic_write_json, read_json

try:
    import fcntl
except ImportError:  # not POSIX: only threads of one process are kept apart
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
PREDICTIONS, ERRORS, RUNS = "predictions", "errors", "runs"
CATALOG_META = "catalog.json"
PARTITION = "run"
TIMESTAMP = pa.timestamp("us", tz="UTC")


def prob_column(class_name: str) -> str:
    """``prob_`` + the class name in snake case: 'Edge-on with Bulge' -> 'prob_edge_on_with_bulge'."""
    return "prob_" + (re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_") or "class")


def prob_columns(class_names: Sequence[str]) -> list[str]:
    """One probability column per class, in class-index order; made unique by the index if names collide."""
    cols = [prob_column(c) for c in class_names]
    return [f"{c}_{i}" if cols.count(c) > 1 else c for i, c in enumerate(cols)]


#: What each column means (docs/catalog.md, Schema): Parquet field metadata, FITS TCOMMn, VOTable DESCRIPTION.
DESCRIPTIONS = {
    "id": "Galaxy id given by the input (else <file stem>-<row> or the image path)",
    "source_file": "File the image was read from",
    "source_row": "Row or position of the image in source_file or in the input catalog",
    "ra": "Right ascension (ICRS) from the input, null when absent or outside [0, 360)",
    "dec": "Declination (ICRS) from the input, null when absent or outside [-90, 90]",
    "pred_label": "Predicted class: index into the class list, argmax of the probabilities",
    "pred_class": "Predicted class name",
    "max_prob": "Largest class probability",
    "entropy": "Entropy of the class probabilities, -sum p ln p, in nats",
    "model_id": "Model id: hash of the checkpoint file and its config",
    "tta": "Whether test-time augmentation averaged the exact views of the model's training symmetry (4 rotations, or 8 with flips; the run's tta_views)",
    "temperature": "Calibration temperature T applied (probabilities are softmax(z / T)); 1 = uncalibrated",
    "run_ts": "Start of the prediction run (UTC)",
    PARTITION: "Prediction run id",
}
#: Units of the columns that have one.
UNITS = {"ra": "deg", "dec": "deg"}


def column_description(name: str, class_names: Sequence[str]) -> str:
    """The description of column ``name`` of a catalog with ``class_names`` (``prob_*`` columns name their class)."""
    probs = dict(zip(prob_columns(class_names), class_names))
    if name in probs:
        return f"Calibrated probability of class '{probs[name]}'"
    return DESCRIPTIONS[name]


def _field(name: str, type_: pa.DataType, class_names: Sequence[str], nullable: bool = True) -> pa.Field:
    meta = {"description": column_description(name, class_names)}
    if name in UNITS:
        meta["unit"] = UNITS[name]
    return pa.field(name, type_, nullable=nullable, metadata=meta)


def prediction_schema(class_names: Sequence[str]) -> pa.Schema:
    """The schema of every predictions file for a model with these classes (the run partition excluded).

    Each field carries its ``description`` (and ``unit``) as field metadata, so any Parquet reader finds them.
    """
    fields = [
        _field("id", pa.string(), class_names, nullable=False),
        _field("source_file", pa.string(), class_names, nullable=False),
        _field("source_row", pa.int64(), class_names),
        _field("ra", pa.float64(), class_names),
        _field("dec", pa.float64(), class_names),
        _field("pred_label", pa.int32(), class_names, nullable=False),
        _field("pred_class", pa.string(), class_names, nullable=False),
        *(_field(c, pa.float32(), class_names, nullable=False) for c in prob_columns(class_names)),
        _field("max_prob", pa.float32(), class_names, nullable=False),
        _field("entropy", pa.float32(), class_names, nullable=False),
        _field("model_id", pa.string(), class_names, nullable=False),
        _field("tta", pa.bool_(), class_names, nullable=False),
        _field("temperature", pa.float64(), class_names, nullable=False),
        _field("run_ts", TIMESTAMP, class_names, nullable=False),
    ]
    meta = {"astroflow.schema_version": str(SCHEMA_VERSION), "astroflow.class_names": json.dumps(list(class_names))}
    return pa.schema(fields, metadata=meta)


ERROR_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_ts", TIMESTAMP, nullable=False),
    ],
    metadata={"astroflow.schema_version": str(SCHEMA_VERSION)},
)

#: The catalog schema for the Galaxy10 DECals classes (the default model).
GALAXY10_SCHEMA = prediction_schema(GALAXY10_CLASS_NAMES)


def with_partition(schema: pa.Schema) -> pa.Schema:
    """The schema a reader of the whole dataset sees: the file schema plus the ``run`` partition column."""
    return schema.append(pa.field(PARTITION, pa.string(), metadata={"description": DESCRIPTIONS[PARTITION]}))


def _partitioning() -> pads.Partitioning:
    return pads.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")


def _part_name(chunk_index: int) -> str:
    return f"part-{chunk_index:06d}.parquet"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Catalog:
    """A catalog root: every run's partitions plus the one schema they share."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / CATALOG_META

    def class_names(self) -> list[str] | None:
        return list(read_json(self.meta_path)["class_names"]) if self.meta_path.is_file() else None

    def schema(self) -> pa.Schema:
        names = self.class_names()
        if names is None:
            raise DataError(f"{self.root}: not a catalog ({CATALOG_META} missing)")
        return prediction_schema(names)

    def ensure_classes(self, class_names: Sequence[str]) -> None:
        """Fix the schema at the first run; refuse a model whose classes would change it."""
        existing = self.class_names()
        if existing is None:
            atomic_write_json(
                self.meta_path,
                {
                    "schema_version": SCHEMA_VERSION,
                    "class_names": list(class_names),
                    "prob_columns": prob_columns(class_names),
                    "partitioning": f"hive ({PARTITION}=<run_id>)",
                },
            )
        elif existing != list(class_names):
            raise DataError(
                f"{self.meta_path}: this catalog holds classes {existing}, the model has {list(class_names)}; "
                "write to another catalog root"
            )

    def run_ids(self) -> list[str]:
        runs = self.root / RUNS
        return sorted(p.name for p in runs.iterdir() if (p / "run.json").is_file()) if runs.is_dir() else []

    def runs(self) -> list[dict[str, Any]]:
        """Every run's record plus its summary and completion record (None: unfinished, rows not visible), oldest first."""
        out = []
        for rid in self.run_ids():
            rec = read_json(self.root / RUNS / rid / "run.json")
            for key in ("summary", "complete"):
                path = self.root / RUNS / rid / f"{key}.json"
                rec[key] = read_json(path) if path.is_file() else None
            out.append(rec)
        return sorted(out, key=lambda r: r.get("started_at", ""))

    @contextmanager
    def open_run(self, run_id: str, meta: dict[str, Any]) -> Iterator[Run]:
        """The run ``run_id``, created with ``meta`` if new, locked against a second writer while open."""
        run = Run(self, run_id)
        run.dir.mkdir(parents=True, exist_ok=True)
        with _lock(run.lock_path, run_id, wait=False):
            run.create(meta)
            run.clean_temporaries()
            run.withdraw()
            yield run

    @contextmanager
    def join_run(self, run_id: str, meta: dict[str, Any]) -> Iterator[Run]:
        """The run ``run_id`` for one of several workers that each commit some of its chunks.

        The lock is held only to create the run and, by :meth:`Run.commit`, around each commit, so
        workers of one run wait on each other for a commit at most and never fail; a commit of a chunk
        another worker already committed writes nothing. ``open_run`` writers still exclude them.
        """
        run = Run(self, run_id, shared=True)
        run.dir.mkdir(parents=True, exist_ok=True)
        with _lock(run.lock_path, run_id, wait=True):
            run.create(meta)
            run.clean_temporaries()
            run.withdraw()
        yield run


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    """One lock per run lock file per process: POSIX record locks never conflict between threads of one process."""
    key = os.path.realpath(path)
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.Lock())


@contextmanager
def _lock(path: Path, run_id: str, *, wait: bool) -> Iterator[None]:
    """An exclusive POSIX record lock on the run (plus a thread lock, for threads of this process).

    The OS drops it when the process dies, so a SIGKILL never leaves it stale; unlike ``flock`` it is
    not inherited by forked DataLoader workers, which may outlive a killed parent by a few seconds.
    ``wait=False`` fails at once when another writer holds it.
    """
    busy = f"run {run_id} is being written by another process ({path})"
    guard = _thread_lock(path)
    if not guard.acquire(blocking=wait):
        raise DataError(busy)
    try:
        if fcntl is None:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DataError(busy) from None
            yield
        finally:
            os.close(fd)
    finally:
        guard.release()


def run_lock(run: Run, *, wait: bool) -> AbstractContextManager[None]:
    """The run's lock on its own, for upkeep that must not overlap a writer of the run (compaction)."""
    return _lock(run.lock_path, run.run_id, wait=wait)


class Run:
    """One run partition: its record, its completion records, and the chunk commit."""

    def __init__(self, catalog: Catalog, run_id: str, *, shared: bool = False) -> None:
        self.catalog = catalog
        self.run_id = run_id
        self.shared = shared
        self.dir = catalog.root / RUNS / run_id
        self.lock_path = self.dir / ".lock"
        self.meta_path = self.dir / "run.json"
        self.chunks_dir = self.dir / "chunks"
        self.predictions_dir = self.dir / PREDICTIONS  # staged while the run is in progress
        self.errors_dir = self.dir / ERRORS
        self.published = {
            self.predictions_dir: catalog.root / PREDICTIONS / f"{PARTITION}={run_id}",
            self.errors_dir: catalog.root / ERRORS / f"{PARTITION}={run_id}",
        }

    @property
    def meta(self) -> dict[str, Any]:
        return read_json(self.meta_path)

    @property
    def started_at(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.meta["started_at"])

    def create(self, meta: dict[str, Any]) -> None:
        """Write ``run.json`` if the run is new (under the lock: its start time is the ``run_ts`` of every chunk)."""
        if not self.meta_path.is_file():
            atomic_write_json(self.meta_path, {"run_id": self.run_id, "started_at": _utcnow().isoformat(), **meta})

    def clean_temporaries(self) -> None:
        """Remove half-written files a killed process left (only ever called under the run lock)."""
        for d in (self.predictions_dir, self.errors_dir, *self.published.values(), self.chunks_dir, self.dir):
            if d.is_dir():
                for p in d.glob(".*.tmp"):
                    p.unlink(missing_ok=True)

    def completed(self) -> dict[int, dict[str, Any]]:
        """Completion records by chunk index."""
        if not self.chunks_dir.is_dir():
            return {}
        out = {}
        for p in self.chunks_dir.glob("*.json"):
            rec = read_json(p)
            out[int(rec["index"])] = rec
        return out

    def commit(
        self, index: int, chunk_id: str, predictions: pa.Table, errors: pa.Table, extra: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Write the chunk's rows, then its completion record: the record is the commit point.

        A worker of a joined run commits under the run lock and writes nothing (returns None) when
        another worker committed the chunk first.
        """
        if not self.shared:
            return self._write_chunk(index, chunk_id, predictions, errors, extra)
        with _lock(self.lock_path, self.run_id, wait=True):
            path = self.chunks_dir / f"{index:06d}.json"
            if path.is_file() and read_json(path).get("chunk_id") == chunk_id:
                return None
            return self._write_chunk(index, chunk_id, predictions, errors, extra)

    def _write_chunk(
        self, index: int, chunk_id: str, predictions: pa.Table, errors: pa.Table, extra: dict[str, Any]
    ) -> dict[str, Any]:
        name = _part_name(index)
        for table, directory in ((predictions, self.predictions_dir), (errors, self.errors_dir)):
            target = directory / name
            if table.num_rows:
                directory.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    pq.write_table(table, tmp, compression="zstd")
            else:
                target.unlink(missing_ok=True)
        record = {
            "index": index,
            "chunk_id": chunk_id,
            "num_items": predictions.num_rows + errors.num_rows,
            "num_predictions": predictions.num_rows,
            "num_errors": errors.num_rows,
            "committed_at": _utcnow().isoformat(),
            **extra,
        }
        atomic_write_json(self.chunks_dir / f"{index:06d}.json", record)
        return record

    def withdraw(self) -> None:
        """Stage again the rows of an incomplete run found published (a kill between publishing and
        ``complete.json``, or a catalog written before staging existed): readers must not see them yet."""
        if self.complete is not None:
            return
        for staged, public in self.published.items():
            if public.is_dir():
                staged.mkdir(parents=True, exist_ok=True)
                for part in public.glob("*.parquet"):
                    if (staged / part.name).exists():
                        part.unlink()
                    else:
                        part.rename(staged / part.name)
                for leftover in public.glob(".*.tmp"):
                    leftover.unlink()
                public.rmdir()

    def mark_complete(self, num_chunks: int) -> None:
        """Publish the staged rows (one directory rename per table), then record the run as complete."""
        for staged, public in self.published.items():
            if staged.is_dir():
                public.parent.mkdir(parents=True, exist_ok=True)
                staged.rename(public)
        atomic_write_json(self.dir / "complete.json", {"num_chunks": num_chunks, "completed_at": _utcnow().isoformat()})

    @property
    def complete(self) -> dict[str, Any] | None:
        path = self.dir / "complete.json"
        return read_json(path) if path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.dir / "summary.json"
        atomic_write_json(path, summary)
        return path

    def class_counts(self, class_names: Sequence[str], low_confidence: float) -> tuple[dict[str, int], int]:
        """Rows per predicted class and rows under ``low_confidence`` max probability, streamed column-wise."""
        counts = np.zeros(len(class_names), dtype=np.int64)
        low = 0
        rows = self.published[self.predictions_dir] if self.complete is not None else self.predictions_dir
        if rows.is_dir():
            dataset = pads.dataset(rows, format="parquet")
            for batch in dataset.to_batches(columns=["pred_label", "max_prob"]):
                labels = batch.column("pred_label").to_numpy()
                counts += np.bincount(labels, minlength=len(class_names))[: len(class_names)]
                low += int((batch.column("max_prob").to_numpy() < low_confidence).sum())
        return {c: int(n) for c, n in zip(class_names, counts)}, low


def predictions_dataset(root: str | Path) -> pads.Dataset:
    """All runs' predictions as one pyarrow dataset (lazy; filter on ``run``, ``model_id``, ... before reading)."""
    catalog = Catalog(root)
    return pads.dataset(
        catalog.root / PREDICTIONS, format="parquet", partitioning=_partitioning(), schema=with_partition(catalog.schema())
    )


def errors_dataset(root: str | Path) -> pads.Dataset:
    return pads.dataset(Path(root) / ERRORS, format="parquet", partitioning=_partitioning(), schema=with_partition(ERROR_SCHEMA))


READ_ATTEMPTS = 5
"""Reads of the whole dataset tried before a missing file is an error: compaction deletes files a reader may just have listed."""


def _read(dataset_fn: Any, root: str | Path, subdir: str, run: str | None, columns: Sequence[str] | None) -> Any:
    if not (Path(root) / subdir).is_dir():
        schema = with_partition(Catalog(root).schema() if subdir == PREDICTIONS else ERROR_SCHEMA)
        table = schema.empty_table()
        return table.select(list(columns)).to_pandas() if columns else table.to_pandas()
    filt = (pads.field(PARTITION) == run) if run is not None else None
    read = lambda: dataset_fn(root).to_table(columns=list(columns) if columns else None, filter=filt).to_pandas()  # noqa: E731
    for _ in range(READ_ATTEMPTS - 1):
        try:
            return read()
        except FileNotFoundError:  # listed just before a compaction swapped a partition: list again
            continue
    return read()


def read_predictions(root: str | Path, *, run: str | None = None, columns: Sequence[str] | None = None) -> Any:
    """The catalog (or one run of it) as a pandas DataFrame, with the ``run`` column."""
    return _read(predictions_dataset, root, PREDICTIONS, run, columns)


def read_errors(root: str | Path, *, run: str | None = None) -> Any:
    """The errors table (or one run's) as a pandas DataFrame: id, source_file, source_row, reason, ..."""
    return _read(errors_dataset, root, ERRORS, run, None)

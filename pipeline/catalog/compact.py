"""``astroflow catalog compact``: merge each complete run's chunk files into a few large files, atomically.

A run partition holds one file per committed chunk (``docs/catalog.md``), so months of nightly runs leave
many small files. Compaction rewrites the files of each complete run partition (predictions and errors)
into files of up to ``max_rows`` rows, in input order, with ``pyarrow.dataset.write_dataset`` into a hidden
directory beside the partition, then swaps the two directories in one ``renameat2(RENAME_EXCHANGE)``
call: any directory listing sees either every old file or the merged ones, never both and never neither.
The old files are then deleted; a reader that listed them just before the swap fails to open them
(``FileNotFoundError``) rather than read a wrong set of rows, and :func:`pipeline.catalog.parquet.read_predictions`
retries. The partition keeps its name, so the ``run`` column is unchanged, and ``runs/<run_id>/`` (run,
chunk and completion records) is untouched: the history stays queryable. Each run is compacted under its
run lock, and a second compaction of the same root is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.catalog.parquet import ERRORS, PREDICTIONS, Catalog, Run, run_lock
from pipeline.errors import DataError

LOCK_FILE = ".compact.lock"
STAGE_MARKER = ".astroflow-stage.json"
"""Present in a stage's output directory (``pipeline.orchestrate.store``): DVC owns it, compaction never touches it."""
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise DataError(f"{a}: compaction needs renameat2 (Linux, glibc >= 2.28) to swap partitions atomically")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 exchange failed: {os.strerror(err)}", str(a), None, str(b))


@contextmanager
def _compaction_lock(root: Path) -> Iterator[None]:
    """One compaction per catalog root at a time (an ``flock`` the OS drops with the process)."""
    import fcntl

    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{root / LOCK_FILE}: another compaction of this catalog is running") from None
        yield
    finally:
        os.close(fd)


def check_compactable(root: Path, stage_output: Path) -> None:
    """Refuse anything but a nightly catalog root: the DVC ``predict`` stage's output is DVC's to version."""
    if root.resolve() == stage_output.resolve() or (root / STAGE_MARKER).exists():
        raise DataError(f"{root}: the DVC predict stage's output is never compacted; give a nightly catalog root (--catalog)")
    if Catalog(root).class_names() is None:
        raise DataError(f"{root}: not a catalog (catalog.json missing)")


def _merge_partition(public: Path, max_rows: int) -> dict[str, int] | None:
    """Rewrite one partition's files as files of up to ``max_rows`` rows and swap them in; None if already one file."""
    staged = public.with_name(f".compact-{public.name}")
    shutil.rmtree(staged, ignore_errors=True)  # left by a killed compaction (new or old files): never visible to readers
    files = sorted(public.glob("*.parquet"))
    if len(files) <= 1:
        return None
    schema = pq.read_schema(files[0])
    dataset = pads.dataset([str(f) for f in files], format="parquet", schema=schema)
    pads.write_dataset(
        dataset, staged, format="parquet", basename_template="part-c{i}.parquet",
        max_rows_per_file=max_rows, max_rows_per_group=min(max_rows, 1 << 17), use_threads=False,
        file_options=pads.ParquetFileFormat().make_write_options(compression="zstd"),
    )
    merged = sorted(staged.glob("*.parquet"))
    if sum(pq.ParquetFile(f).metadata.num_rows for f in merged) != dataset.count_rows():
        shutil.rmtree(staged)
        raise DataError(f"{public}: merged files do not hold the partition's rows; nothing was changed")
    exchange(staged, public)
    shutil.rmtree(staged)  # now the old files
    return {"files_before": len(files), "files_after": len(merged)}


def compact(root: Path, *, max_rows: int = 5_000_000) -> dict[str, Any]:
    """Compact every complete run of the catalog at ``root``; incomplete runs (staged, invisible) are left alone."""
    catalog = Catalog(root)
    out: dict[str, Any] = {"catalog": str(root), "runs": [], "files_before": 0, "files_after": 0}
    with _compaction_lock(root):
        for run_id in catalog.run_ids():
            run = Run(catalog, run_id)
            with run_lock(run, wait=True):
                if run.complete is None:
                    continue
                for table in (PREDICTIONS, ERRORS):
                    public = run.published[run.dir / table]
                    done = _merge_partition(public, max_rows) if public.is_dir() else None
                    if done is not None:
                        out["runs"].append({"run": run_id, "table": table, **done})
                        out["files_before"] += done["files_before"]
                        out["files_after"] += done["files_after"]
    return out

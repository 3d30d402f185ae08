"""``astroflow catalog compact``: each complete run's chunk files merged atomically, every row exactly once,
even for a reader that reads the whole catalog in a loop while compaction runs; run history kept; the DVC
stage's catalog refused."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa

from pipeline.catalog.parquet import ERROR_SCHEMA, Catalog, prediction_schema, read_errors, read_predictions
from pipeline.config import GALAXY10_CLASS_NAMES
from conftest import REPO_ROOT

RUNS, CHUNKS, ROWS = 16, 8, 50


def _table(schema: pa.Schema, ids: list[str]) -> pa.Table:
    """Rows of ``schema`` whose ``id`` column is ``ids`` and every other column a constant of its type."""
    n = len(ids)
    const = {pa.string(): "x", pa.int64(): 0, pa.int32(): 0, pa.float64(): 1.0, pa.float32(): 0.1, pa.bool_(): False}
    now = dt.datetime.now(dt.UTC)
    cols = {f.name: ids if f.name == "id" else [now if pa.types.is_timestamp(f.type) else const[f.type]] * n for f in schema}
    return pa.table(cols, schema=schema)


def _catalog(root: Path) -> set[str]:
    """A catalog of RUNS complete runs of CHUNKS chunk files each (one error per run), plus one unfinished run."""
    cat = Catalog(root)
    cat.ensure_classes(GALAXY10_CLASS_NAMES)
    schema = prediction_schema(GALAXY10_CLASS_NAMES)
    ids: set[str] = set()
    for r in range(RUNS + 1):
        with cat.open_run(f"r{r:03d}", {"chunk_size": ROWS}) as run:
            for c in range(CHUNKS):
                chunk_ids = [f"{r}-{c}-{i}" for i in range(ROWS)]
                errors = _table(ERROR_SCHEMA, [f"{r}-{c}-bad"]) if c == 0 else ERROR_SCHEMA.empty_table()
                run.commit(c, f"k-{c:06d}", _table(schema, chunk_ids), errors, {})
                if r < RUNS:
                    ids.update(chunk_ids)
            if r < RUNS:  # the last run stays unfinished: staged, invisible
                run.mark_complete(CHUNKS)
    return ids


def _compact(root: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "catalog", "compact", "--catalog", str(root), "--workdir", str(workdir), "-q"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def _files(root: Path) -> int:
    return len(list((root / "predictions").rglob("*.parquet")))


def test_compaction_keeps_every_row_exactly_once_under_a_concurrent_reader(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    expected = _catalog(root)
    runs_before = Catalog(root).runs()
    assert _files(root) == RUNS * CHUNKS
    reads: list[int] = []
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                df = read_predictions(root, columns=["id", "run"])
            except Exception as exc:  # a half state may show as a missing file, too
                bad.append(f"read {len(reads) + 1}: {type(exc).__name__}: {exc}")
                continue
            reads.append(len(df))
            if len(df) != len(expected) or set(df["id"]) != expected or df["id"].duplicated().any():
                bad.append(f"read {len(reads)}: {len(df)} rows, {df['id'].duplicated().sum()} duplicated")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        proc = _compact(root, tmp_path)
    finally:
        stop.set()
        thread.join()
    assert proc.returncode == 0, proc.stderr
    assert not bad, bad[:5]
    assert len(reads) >= 3  # the reader ran throughout the compaction
    assert _files(root) == RUNS  # one file per complete run
    df = read_predictions(root)
    assert set(df["id"]) == expected and len(df) == len(expected)
    assert sorted(df["run"].unique()) == [f"r{r:03d}" for r in range(RUNS)]  # the run column is kept
    assert Catalog(root).runs() == runs_before  # run records, chunk and completion records untouched
    assert len(read_errors(root)) == RUNS
    assert len(list((root / "runs" / f"r{RUNS:03d}" / "predictions").glob("*.parquet"))) == CHUNKS  # unfinished: staged

    again = _compact(root, tmp_path)
    assert again.returncode == 0 and '"files_before": 0' in again.stdout  # nothing left to merge


def test_compaction_refuses_the_dvc_stage_catalog(tmp_path: Path) -> None:
    stage_catalog = tmp_path / "data" / "catalog"
    _catalog(stage_catalog)
    before = _files(stage_catalog)
    proc = _compact(stage_catalog, tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "DVC predict stage" in line and str(stage_catalog) in line
    assert _files(stage_catalog) == before

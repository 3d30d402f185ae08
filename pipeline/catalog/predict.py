"""Stage ``predict``: classify a pile of cutouts into the Parquet catalog (``docs/catalog.md``).

The input is read in chunks of ``predict.chunk_size`` items, classified and committed atomically one
chunk at a time by :mod:`pipeline.catalog.classify`, with the checkpoint loaded once into a
:class:`~pipeline.score.trained_model.TrainedModel`. This module holds the entry points.

A run is identified by the model id, the input's identity, TTA and the temperature, so re-running
the same model on the same input resumes (or, when finished, does nothing), while a new model, new
input, new calibration or TTA setting starts a new run partition.

A run can also be fanned out: :func:`plan_run` names its chunks without running the model, workers
call ``predict(..., chunks=[...])`` on disjoint chunks (in other threads, processes or machines), and
:func:`finalize_run` writes ``complete.json`` and the summary once every chunk is committed
(:mod:`pipeline.catalog.distributed` does that fan-out). Every entry point takes an optional ``model``,
the checkpoint already loaded, so a worker that runs many chunks loads it once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.catalog.classify import COORDS_OUT_OF_RANGE, RunSetup, committed, index_list, note, run_chunks, say
from pipeline.catalog.parquet import Catalog, Run
from pipeline.config import Config, stable_hash
from pipeline.errors import DataError
from pipeline.catalog.inputs import InputReader, open_input, with_geometry
from pipeline.io import atomic_write_json
from pipeline.layout import StageRun
from pipeline.score.calibrate import CALIBRATION_FILE
from pipeline.score.trained_model import TrainedModel


# ------------------------------------------------------------------ calibration and identity


def resolve_calibration(calibration: Path | None, model: TrainedModel, tta: bool) -> tuple[float, str]:
    """(temperature, where it came from): the given file, else ``calibration.json`` beside the checkpoint, else 1.

    Either file must keep the model's calibration contract (:meth:`TrainedModel.temperature`): a
    temperature fitted for another model or TTA setting would rescale scores it was never fitted on.
    """
    path = Path(calibration) if calibration is not None else model.path.parent / CALIBRATION_FILE
    if calibration is None and not path.is_file():
        return 1.0, f"none ({path} not found): temperature 1, probabilities are uncalibrated"
    return model.temperature(path, tta=tta), str(path)


def make_run_id(mid: str, identity: dict[str, Any], tta: bool, temperature: float) -> str:
    """Deterministic, so a restart finds its own partition; starts with a letter so no reader takes it for a number."""
    return "r" + stable_hash({"model_id": mid, "input": identity, "tta": tta, "temperature": temperature})


# ------------------------------------------------------------------ the stage


def _setup(
    cfg: Config, checkpoint: Path, input_path: Path | None, out_root: Path, calibration: Path | None, shards_dir: Path | None,
    model: TrainedModel | None = None,
) -> RunSetup:
    pc = cfg.predict
    notes: list[str] = []
    model = model if model is not None else TrainedModel.load(checkpoint)
    temperature, cal_source = resolve_calibration(calibration, model, pc.tta)
    if cal_source.startswith("none"):
        note(notes, f"calibration: {cal_source}")
    reader = with_geometry(open_input(input_path, pc.input_kind, shards_dir=shards_dir, pixels=cfg.data.folder.pixels), model.geometry)
    identity = reader.identity
    run_id = make_run_id(model.model_id, identity, pc.tta, temperature)
    catalog = Catalog(out_root)
    catalog.ensure_classes(model.class_names)
    meta = {
        "model_id": model.model_id,
        "model_name": model.model_name,
        "checkpoint": str(checkpoint.resolve()),
        "class_names": model.class_names,
        "input": reader.describe(),
        "input_identity": identity,
        "chunk_size": pc.chunk_size,
        "tta": pc.tta,
        "tta_views": model.num_views(pc.tta),
        "temperature": temperature,
        "calibration": cal_source,
    }
    return RunSetup(model, temperature, reader, run_id, catalog, meta, out_root, notes)


def _run_chunk_size(run: Run, configured: int, notes: list[str]) -> int:
    chunk_size = int(run.meta["chunk_size"])
    if chunk_size != configured:
        note(notes, f"run {run.run_id} keeps the chunk_size it started with, {chunk_size} (predict.chunk_size is {configured})")
    return chunk_size


def _num_chunks(reader: InputReader, chunk_size: int) -> int:
    """Chunk count from the item index alone (nothing decoded), as ``plan_chunks`` would cut it."""
    try:
        n = sum(1 for _ in reader.items())
    finally:
        reader.close()
    return math.ceil(n / chunk_size)


@dataclass(frozen=True)
class RunPlan:
    """A run's chunks as a fan-out needs them: one ``predict(..., chunks=[i])`` per pending index, then ``finalize_run``."""

    run_id: str
    model_id: str
    chunk_size: int
    num_chunks: int
    pending: tuple[int, ...]
    complete: bool


def plan_run(
    cfg: Config,
    checkpoint: Path,
    input_path: Path | None,
    out_root: Path,
    *,
    calibration: Path | None = None,
    shards_dir: Path | None = None,
    model: TrainedModel | None = None,
) -> RunPlan:
    """Create (or find) the run of this model on this input and list its chunks, without running the model.

    Creating the run here fixes its start time and chunk size before any worker joins it.
    """
    checkpoint, out_root = Path(checkpoint), Path(out_root)
    s = _setup(cfg, checkpoint, input_path, out_root, calibration, shards_dir, model)
    with s.catalog.join_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, cfg.predict.chunk_size, s.notes)
        num_chunks = _num_chunks(s.reader, chunk_size)
        done = committed(run, s.reader, chunk_size)
        return RunPlan(
            run_id=s.run_id,
            model_id=s.model.model_id,
            chunk_size=chunk_size,
            num_chunks=num_chunks,
            pending=tuple(i for i in range(num_chunks) if i not in done),
            complete=run.complete is not None,
        )


def predict(
    cfg: Config,
    checkpoint: Path,
    input_path: Path | None,
    out_root: Path,
    *,
    calibration: Path | None = None,
    shards_dir: Path | None = None,
    model: TrainedModel | None = None,
    chunks: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify ``input_path`` (None: the test split of ``shards_dir``) into the catalog at ``out_root``.

    Returns the run summary (also written to ``runs/<run_id>/summary.json``): ``num_written`` rows and
    ``num_skipped_chunks`` of this call, ``num_errors`` of the whole run, class counts, ``model_id``, ``run_id``.

    With ``chunks`` only those chunk indices of the run are classified, as one worker of a fan-out
    (see :func:`plan_run`): the run is joined rather than locked, nothing is finalised, and the
    result counts this call's chunks only; :func:`finalize_run` ends the run.
    """
    pc = cfg.predict
    checkpoint, out_root = Path(checkpoint), Path(out_root)
    s = _setup(cfg, checkpoint, input_path, out_root, calibration, shards_dir, model)
    if chunks is not None:
        return _predict_chunks(cfg, s, chunks, progress)
    notes = s.notes
    start = time.perf_counter()
    with s.catalog.open_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, pc.chunk_size, notes)
        if run.complete is not None:
            s.reader.close()
            stats = {"written": 0, "errors": 0, "new_chunks": 0}
            note(notes, f"nothing to do: model {s.model.model_id} already classified this input in run {s.run_id}; the catalog is unchanged")
            status = "up_to_date"
        else:
            stats = run_chunks(pc, run, s, chunk_size, None, progress)
            status = "complete" if stats["new_chunks"] else "up_to_date"
            if not run.completed():
                note(notes, f"the input holds no images: {s.reader.describe()}")
            elif not stats["new_chunks"]:
                note(notes, f"nothing to do: every chunk of run {s.run_id} was already committed")
        return _finish(cfg, run, s, stats, status, time.perf_counter() - start)


def _predict_chunks(cfg: Config, s: RunSetup, chunks: Sequence[int], progress: bool) -> dict[str, Any]:
    selected = sorted({int(i) for i in chunks})
    if any(i < 0 for i in selected):
        raise DataError(f"chunk indices must be >= 0, got {selected}")
    start = time.perf_counter()
    with s.catalog.join_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, cfg.predict.chunk_size, s.notes)
        pending = set(selected) - set(committed(run, s.reader, chunk_size))
        if run.complete is not None or not pending:
            s.reader.close()
            stats = {"written": 0, "errors": 0, "new_chunks": 0}
        else:
            stats = run_chunks(cfg.predict, run, s, chunk_size, pending, progress)
    new = stats["new_chunks"]
    if not new:
        note(s.notes, f"nothing to do: chunk(s) {selected} of run {s.run_id} were already committed")
    return {
        "run_id": s.run_id,
        "model_id": s.model.model_id,
        "status": "partial" if new else "up_to_date",
        "chunks": selected,
        "num_new_chunks": new,
        "num_skipped_chunks": len(selected) - new,
        "num_written": stats["written"],
        "num_errors_new": stats["errors"],
        "threads": stats.get("threads"),
        "streams": stats.get("streams"),
        "elapsed_s": round(time.perf_counter() - start, 3),
        "notes": s.notes,
    }


def finalize_run(
    cfg: Config,
    checkpoint: Path,
    input_path: Path | None,
    out_root: Path,
    *,
    calibration: Path | None = None,
    shards_dir: Path | None = None,
    model: TrainedModel | None = None,
    chunk_results: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """End a fanned-out run: mark it complete and write its summary, as a whole ``predict`` call does.

    Refuses (``DataError``) while any chunk lacks its completion record, so a fan-out with a failed
    chunk never looks finished. ``chunk_results`` (the workers' return values) supply this call's
    ``num_written``/``num_errors_new``/``num_skipped_chunks`` and ``elapsed_s`` (the workers' seconds,
    summed); counts of the whole run come from the catalog. ``status`` is ``complete`` unless the run
    was complete before and the workers committed nothing.
    """
    checkpoint, out_root = Path(checkpoint), Path(out_root)
    s = _setup(cfg, checkpoint, input_path, out_root, calibration, shards_dir, model)
    start = time.perf_counter()
    with s.catalog.open_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, cfg.predict.chunk_size, s.notes)
        num_chunks = _num_chunks(s.reader, chunk_size)
        missing = sorted(set(range(num_chunks)) - set(committed(run, s.reader, chunk_size)))
        if missing:
            raise DataError(
                f"run {s.run_id}: {len(missing)} of {num_chunks} chunk(s) not committed ({index_list(missing)}); "
                "classify them (predict with chunks=...) before finalising"
            )
        stats = {
            "written": sum(int(r.get("num_written", 0)) for r in chunk_results),
            "errors": sum(int(r.get("num_errors_new", 0)) for r in chunk_results),
            "new_chunks": sum(int(r.get("num_new_chunks", 0)) for r in chunk_results),
        }
        for key in ("threads", "streams"):
            values = [r[key] for r in chunk_results if r.get(key)]
            stats[key] = max(values) if values else None
        status = "complete" if stats["new_chunks"] or run.complete is None else "up_to_date"
        if not num_chunks:
            note(s.notes, f"the input holds no images: {s.reader.describe()}")
        elif status == "up_to_date":
            note(s.notes, f"nothing to do: run {s.run_id} was already complete")
        worker_s = sum(float(r.get("elapsed_s") or 0) for r in chunk_results)
        return _finish(cfg, run, s, stats, status, worker_s + time.perf_counter() - start)


def _finish(cfg: Config, run: Run, s: RunSetup, stats: dict[str, Any], status: str, elapsed: float) -> dict[str, Any]:
    """Mark the run complete, write and print its summary (called with every chunk committed, under the run lock)."""
    pc = cfg.predict
    summary = _summary(run, s.model.class_names, pc.low_confidence, stats, elapsed)
    summary.update(status=status, backend=pc.backend, notes=s.notes, catalog=str(s.out_root))
    summary["summary_path"] = str(run.write_summary(summary))
    _print_summary(summary)
    return summary


def _summary(run: Run, class_names: list[str], low_confidence: float, stats: dict[str, int], elapsed: float) -> dict[str, Any]:
    """Counts of the whole run (every committed chunk), plus what this call did."""
    records = run.completed()
    meta = run.meta
    if run.complete is None:
        run.mark_complete(len(records))
    counts, low = run.class_counts(class_names, low_confidence)
    return {
        "run_id": run.run_id,
        "model_id": meta["model_id"],
        "started_at": meta["started_at"],
        "input": meta["input"],
        "tta": meta["tta"],
        "tta_views": meta.get("tta_views"),
        "temperature": meta["temperature"],
        "calibration": meta["calibration"],
        "num_chunks": len(records),
        "num_skipped_chunks": len(records) - stats["new_chunks"],
        "num_new_chunks": stats["new_chunks"],
        "num_written": stats["written"],
        "num_errors_new": stats["errors"],
        "num_predicted": sum(int(r["num_predictions"]) for r in records.values()),
        "num_errors": sum(int(r["num_errors"]) for r in records.values()),
        COORDS_OUT_OF_RANGE: sum(int(r.get(COORDS_OUT_OF_RANGE, 0)) for r in records.values()),
        "class_counts": counts,
        "low_confidence": {"threshold": low_confidence, "count": low},
        "threads": stats.get("threads"),
        "streams": stats.get("streams"),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round((stats["written"] + stats["errors"]) / elapsed, 1) if elapsed > 0 else None,
    }


def _print_summary(s: dict[str, Any]) -> None:
    head = (
        f"run {s['run_id']} ({s['status']}): {s['num_predicted']} classified, {s['num_errors']} failed, "
        f"{s['low_confidence']['count']} below max_prob {s['low_confidence']['threshold']}; "
        f"this call wrote {s['num_written']} rows, skipped {s['num_skipped_chunks']} committed chunk(s)"
    )
    say(head)
    width = max((len(c) for c in s["class_counts"]), default=0)
    for name, n in s["class_counts"].items():
        print(f"  {name:<{width}}  {n}", file=sys.stderr)
    if s["num_errors"]:
        say(f"{s['num_errors']} input(s) could not be classified: see {Path(s['catalog']) / 'errors'}")
    if s[COORDS_OUT_OF_RANGE]:
        say(f"{s[COORDS_OUT_OF_RANGE]} row(s) had ra outside [0, 360) or dec outside [-90, 90]; stored as null")
    say(f"summary: {s['summary_path']}")


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``predict`` stage: ``predict.input`` (None: ``shard``'s test split) into the catalog at ``run.out``."""
    from pipeline.learn.train import BEST

    source = run.cfg.predict.input
    input_path = None if source is None else (run.workdir / Path(source).expanduser())
    calibration = run.inputs["calibrate"] / CALIBRATION_FILE
    summary = predict(
        run.cfg,
        run.inputs["train"] / BEST,
        input_path,
        run.out,
        calibration=calibration if calibration.is_file() else None,
        shards_dir=run.inputs["shard"],
        progress=run.progress,
    )
    if run.summary_file is not None:
        atomic_write_json(run.summary_file, json.loads(json.dumps(summary, default=str)))
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    return f"run {summary['run_id']} {summary['status']}: {summary['num_written']} rows written, {summary['num_errors']} failed"


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.catalog.predict ARGS`` is ``astroflow predict ARGS``: one parser, one set of exit codes."""
    from pipeline.cli import main as cli_main

    return cli_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""Classify a run's chunks: decode batches in DataLoader workers, score them in streams, commit each chunk.

DataLoader workers decode and preprocess batches (the model's own ``eval_batch_transform``); the main
process scores them through :mod:`pipeline.score.trained_model` (torch, optionally autocast, or
onnxruntime; optionally TTA over the training symmetry), up to ``predict.streams`` batches at once; a chunk is committed
atomically with its completion record as soon as its last batch is scored. Memory is bounded by the
chunk and prefetch sizes, never by the input. The entry points (whole run, fan-out, finalising) are
:mod:`pipeline.catalog.predict`.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.catalog.inputs import InputReader, Record, check_image, plan_chunks, with_geometry
from pipeline.catalog.parquet import ERROR_SCHEMA, Catalog, Run, prediction_schema, prob_columns
from pipeline.config import PredictConfig
from pipeline.data.transforms import eval_batch_transform
from pipeline.errors import DataError
from pipeline.runtime import compute_threads, resolve_device
from pipeline.score.trained_model import Backend, OnnxBackend, TorchBackend, TrainedModel, TTAGroup, probabilities
from pipeline.progress import tqdm


COORDS_OUT_OF_RANGE = "num_coords_out_of_range"
"""Rows whose ra or dec was outside [0, 360) x [-90, 90] and was stored as null (chunk records, summary)."""


def say(message: str) -> None:
    print(f"astroflow predict: {message}", file=sys.stderr, flush=True)


def note(notes: list[str], message: str) -> None:
    """Record ``message`` in the run's notes (they go into its summary) and say it now."""
    notes.append(message)
    say(message)


@dataclass
class RunSetup:
    """What every entry point derives from (config, checkpoint, input) before touching the catalog."""

    model: TrainedModel
    temperature: float
    reader: InputReader
    run_id: str
    catalog: Catalog
    meta: dict[str, Any]
    out_root: Path
    notes: list[str]


# ------------------------------------------------------------------ decoding (DataLoader workers)


@dataclass
class _Decoded:
    chunk: int
    batch: int
    records: list[Record]
    x: torch.Tensor


class _BatchDecoder(torch.utils.data.Dataset):
    """Map-style dataset whose 'indices' are batch specs: a worker decodes and preprocesses one batch."""

    def __init__(self, reader: InputReader, img_size: int, input_range: str) -> None:
        self.reader = reader
        self.img_size = img_size
        self.transform = eval_batch_transform(img_size, input_range)

    def __getitem__(self, spec: tuple[int, int, list[Any]]) -> _Decoded:
        chunk, batch, items = spec
        records = self.reader.load(items)
        for rec in records:
            if rec.error is None:
                rec.error = check_image(rec.image)
        good = [rec for rec in records if rec.error is None]
        try:
            x = self.transform([rec.image for rec in good]) if good else torch.empty(0, 3, self.img_size, self.img_size)
        except Exception:  # find the image(s) at fault: a preprocessing failure is that image's problem only
            x = self._one_by_one(good)
        for rec in records:
            rec.image = None
        return _Decoded(chunk, batch, records, x)

    def _one_by_one(self, records: list[Record]) -> torch.Tensor:
        tensors = []
        for rec in records:
            try:
                tensors.append(self.transform([rec.image])[0])
            except Exception as exc:
                rec.error = f"preprocessing failed: {type(exc).__name__}: {exc}"
        return torch.stack(tensors) if tensors else torch.empty(0, 3, self.img_size, self.img_size)


def _identity(x: Any) -> Any:
    return x


# ------------------------------------------------------------------ scoring


def inference_streams(streams: int, threads: int, device: torch.device) -> int:
    """Batches in flight: ``streams`` if set, else one per compute thread on CPU and one on a GPU.

    On CPU, single-threaded streams beat one multi-threaded call for cutout-sized models: a batch's
    small layers leave intra-op threads idle, and other streams fill the gaps (and the decode and
    commit work) instead (docs/catalog.md, benchmarks/results/predict_throughput_cpu.md).
    """
    if streams:
        return streams
    return 1 if device.type != "cpu" else max(1, threads)


def score_stream(
    backend: Backend, batches: Iterable[_Decoded], streams: int, *, tta: TTAGroup, temperature: float, num_classes: int
) -> Iterator[tuple[_Decoded, np.ndarray]]:
    """``(batch, probabilities)`` in input order, with up to ``streams`` batches scored at once in threads.

    ``tta`` holds the views to average (:meth:`TrainedModel.tta_views`); empty: no test-time augmentation.

    onnxruntime and torch release the GIL while they compute, so the streams run in parallel.
    """

    def score(dec: _Decoded) -> np.ndarray:
        if not len(dec.x):
            return np.zeros((0, num_classes))
        with torch.inference_mode():  # thread-local: entered in the thread that scores
            return probabilities(backend, dec.x, tta=tta, temperature=temperature)

    if streams <= 1:
        for dec in batches:
            yield dec, score(dec)
        return
    with ThreadPoolExecutor(streams, thread_name_prefix="score") as pool:
        pending: deque[tuple[_Decoded, Future[np.ndarray]]] = deque()
        for dec in batches:
            pending.append((dec, pool.submit(score, dec)))
            if len(pending) > streams:  # one batch queued beyond the streams: a freed stream starts at once
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _backend(pc: PredictConfig, s: RunSetup, device: torch.device, threads: int) -> Backend:
    """``predict.backend``; onnx runs an export of this very model (made into the catalog when none matches)."""
    if pc.backend != "onnx":
        return TorchBackend(s.model.network, device, pc.amp)
    if pc.amp != "none":
        s.notes.append("predict.amp is ignored by the onnx backend")
    return OnnxBackend(_onnx_file(s.model, s.out_root, s.notes), device, threads)


def _onnx_file(model: TrainedModel, out_root: Path, notes: list[str]) -> Path:
    """An ONNX file of this very model: ``<checkpoint>.onnx`` if it matches, else one exported into the catalog."""
    from pipeline.score.export import export_onnx, onnx_metadata

    mid = model.model_id
    for candidate in (model.path.with_suffix(".onnx"), out_root / "models" / f"{mid}.onnx"):
        if candidate.is_file() and onnx_metadata(candidate).get("astroflow.model_id") == mid:
            return candidate
    target = out_root / "models" / f"{mid}.onnx"
    note(notes, f"no ONNX export of model {mid} found; exported one to {target}")
    return export_onnx(model, target)


# ------------------------------------------------------------------ tables


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def null_bad_coords(records: list[Record]) -> int:
    """Set ra outside [0, 360) or dec outside [-90, 90] to null (one row's bad value is no reason to stop a run);
    returns how many records had one, for the run summary."""
    bad = 0
    for rec in records:
        ra_bad = rec.ra is not None and not 0.0 <= rec.ra < 360.0
        dec_bad = rec.dec is not None and not -90.0 <= rec.dec <= 90.0
        if ra_bad or dec_bad:
            bad += 1
            rec.ra = None if ra_bad else rec.ra
            rec.dec = None if dec_bad else rec.dec
    return bad


def _prediction_table(
    records: list[Record], probs: np.ndarray, schema: pa.Schema, class_names: list[str], const: dict[str, Any]
) -> pa.Table:
    n = len(records)
    labels = probs.argmax(axis=1).astype(np.int32) if n else np.zeros(0, np.int32)
    probs32 = probs.astype(np.float32)
    cols: dict[str, Any] = {
        "id": [r.id for r in records],
        "source_file": [r.source_file for r in records],
        "source_row": [r.source_row for r in records],
        "ra": [r.ra for r in records],
        "dec": [r.dec for r in records],
        "pred_label": labels,
        "pred_class": [class_names[i] for i in labels],
    }
    for j, name in enumerate(prob_columns(class_names)):
        cols[name] = probs32[:, j] if n else np.zeros(0, np.float32)
    cols["max_prob"] = probs32.max(axis=1) if n else np.zeros(0, np.float32)
    cols["entropy"] = _entropy(probs).astype(np.float32) if n else np.zeros(0, np.float32)
    for key, value in const.items():
        cols[key] = [value] * n
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)


def _error_table(records: list[Record], const: dict[str, Any]) -> pa.Table:
    cols = {
        "id": [r.id for r in records],
        "source_file": [r.source_file for r in records],
        "source_row": [r.source_row for r in records],
        "reason": [r.error for r in records],
        "model_id": [const["model_id"]] * len(records),
        "run_ts": [const["run_ts"]] * len(records),
    }
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in ERROR_SCHEMA}, schema=ERROR_SCHEMA)


def scored_tables(
    parts: Iterable[tuple[list[Record], np.ndarray]], class_names: list[str], const: dict[str, Any]
) -> tuple[pa.Table, pa.Table, int]:
    """(predictions, errors, rows with out-of-range coordinates) of scored batches: what a chunk commits and the API returns.

    ``parts`` are ``(records, probabilities of the records without error)`` in input order; ``const`` holds
    the columns equal on every row (``model_id``, ``tta``, ``temperature``, ``run_ts``).
    """
    good: list[Record] = []
    bad: list[Record] = []
    probs = [np.zeros((0, len(class_names)))]
    for recs, p in parts:
        good.extend(r for r in recs if r.error is None)
        bad.extend(r for r in recs if r.error is not None)
        probs.append(p)
    bad_coords = null_bad_coords(good)
    table = _prediction_table(good, np.concatenate(probs), prediction_schema(class_names), class_names, const)
    return table, _error_table(bad, const), bad_coords


def classify_items(
    reader: InputReader, items: list[Any], model: TrainedModel, backend: Backend, *, batch_size: int, tta: bool, const: dict[str, Any]
) -> tuple[pa.Table, pa.Table, int]:
    """Classify ``items`` of ``reader`` in this process, as one chunk of a run would be (the Python API's path).

    Same decoding, checks, preprocessing, scores and rows as :func:`run_chunks`; ``const["temperature"]`` is applied.
    """
    decoder = _BatchDecoder(with_geometry(reader, model.geometry), model.img_size, model.input_range)
    specs = [(0, b, items[i : i + batch_size]) for b, i in enumerate(range(0, len(items), batch_size))]
    n = len(model.class_names)
    scored = score_stream(backend, map(decoder.__getitem__, specs), 1, tta=model.tta_views(tta), temperature=const["temperature"], num_classes=n)
    return scored_tables(((dec.records, p) for dec, p in scored), model.class_names, const)


# ------------------------------------------------------------------ chunks


@dataclass
class _ChunkState:
    chunk_id: str
    num_batches: int
    parts: dict[int, tuple[list[Record], np.ndarray]] = field(default_factory=dict)


class _Chunks:
    """The batch specs of the chunks to classify, and their scored batches put back together and committed."""

    def __init__(self, pc: PredictConfig, run: Run, s: RunSetup, chunk_size: int, done: set[int], selected: set[int] | None) -> None:
        self.run, self.reader, self.chunk_size, self.batch_size = run, s.reader, chunk_size, pc.batch_size
        self.done, self.selected = done, selected
        self.class_names = s.model.class_names
        self.const = {"model_id": s.model.model_id, "tta": pc.tta, "temperature": s.temperature, "run_ts": run.started_at}
        self.states: dict[int, _ChunkState] = {}
        self.planned: set[int] = set()
        self.stats = {"written": 0, "errors": 0, "new_chunks": 0}

    def specs(self) -> Iterator[tuple[int, int, list[Any]]]:
        """``(chunk, batch, items)`` of every pending chunk (of the ``selected`` ones, if given), in input order."""
        last = max(self.selected) if self.selected else None
        first = min(self.selected) if self.selected else 0
        for plan in plan_chunks(self.reader, self.chunk_size, done=self.done, first=first):
            if last is not None and plan.index > last:
                return
            if self.selected is not None and plan.index not in self.selected:
                continue
            self.planned.add(plan.index)
            nb = math.ceil(len(plan.items) / self.batch_size)
            self.states[plan.index] = _ChunkState(plan.chunk_id, nb)
            for b in range(nb):
                yield plan.index, b, plan.items[b * self.batch_size : (b + 1) * self.batch_size]

    def add(self, dec: _Decoded, probs: np.ndarray) -> None:
        """Keep a scored batch; commit its chunk once every batch of it is in."""
        state = self.states[dec.chunk]
        state.parts[dec.batch] = (dec.records, probs)
        if len(state.parts) == state.num_batches:
            self._commit(dec.chunk, self.states.pop(dec.chunk))

    def _commit(self, index: int, state: _ChunkState) -> None:
        parts = [state.parts[b] for b in range(state.num_batches)]
        table, errors, bad_coords = scored_tables(parts, self.class_names, self.const)
        if self.run.commit(index, state.chunk_id, table, errors, {COORDS_OUT_OF_RANGE: bad_coords}) is None:
            return  # another worker of the run committed it first; its rows stand
        self.stats["written"] += table.num_rows
        self.stats["errors"] += errors.num_rows
        self.stats["new_chunks"] += 1

    def check_finished(self) -> None:
        """Every planned chunk committed, and every selected chunk exists in the input."""
        run_id = self.run.run_id
        if self.states:
            raise DataError(f"chunks {sorted(self.states)} of run {run_id} were planned but never completed")
        if self.selected is not None and (absent := sorted(self.selected - self.planned - self.done)):
            raise DataError(
                f"run {run_id} has no chunk(s) {index_list(absent)}: the input ends before them (chunks of {self.chunk_size} items)"
            )


def index_list(indices: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices) - limit} more)" if len(indices) > limit else "")


def committed(run: Run, reader: InputReader, chunk_size: int) -> dict[int, dict[str, Any]]:
    """Completion records of this input's chunks (a record with another chunk id is redone, not counted)."""
    key = reader.input_key(chunk_size)
    return {i: rec for i, rec in run.completed().items() if rec.get("chunk_id") == f"{key}-{i:06d}"}


def run_chunks(pc: PredictConfig, run: Run, s: RunSetup, chunk_size: int, selected: set[int] | None, progress: bool) -> dict[str, Any]:
    """Decode, classify and commit every chunk the run has not committed yet (only ``selected`` ones if given)."""
    records = run.completed()
    done = set(committed(run, s.reader, chunk_size))
    device = resolve_device(pc.device, "predict.device")
    if done and selected is None:
        note(s.notes, f"resuming run {run.run_id}: {len(done)} chunk(s) already committed")
    chunks = _Chunks(pc, run, s, chunk_size, done, selected)
    loader = torch.utils.data.DataLoader(
        _BatchDecoder(s.reader, s.model.img_size, s.model.input_range),
        sampler=chunks.specs(),
        batch_size=None,
        collate_fn=_identity,
        num_workers=pc.workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)  # workers fork here, before the model is built, so they never carry it
    threads = compute_threads(pc.threads, pc.workers)
    streams = inference_streams(pc.streams, threads, device)
    stream_threads = max(1, threads // streams)
    backend = _backend(pc, s, device, stream_threads)
    done_items = sum(int(records[i].get("num_items", 0)) for i in done) if selected is None else 0
    total = s.reader.num_items if selected is None else None
    bar = tqdm(total=total, initial=done_items, desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    torch_threads = torch.get_num_threads()
    # With onnxruntime, torch only glues (softmax of a few logits): one torch thread, because its idle OpenMP
    # threads spin on the cores onnxruntime's threads need (measured: 2-thread ORT 1,100 -> 1,900 img/s).
    torch.set_num_threads(1 if pc.backend == "onnx" else stream_threads)
    try:
        num_classes = len(s.model.class_names)
        for dec, probs in score_stream(backend, batches, streams, tta=s.model.tta_views(pc.tta), temperature=s.temperature, num_classes=num_classes):
            chunks.add(dec, probs)
            bar.update(len(dec.records))
    finally:
        torch.set_num_threads(torch_threads)
        bar.close()
        s.reader.close()
        del batches
    chunks.check_finished()
    return {**chunks.stats, "threads": threads, "streams": streams}

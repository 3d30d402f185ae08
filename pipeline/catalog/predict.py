"""Stage ``predict``: classify a pile of cutouts into the Parquet catalog (``docs/catalog.md``).

The input is read in chunks of ``predict.chunk_size`` items; DataLoader workers decode and preprocess
batches (the model's own ``eval_transform``), the main process runs the model under
``torch.inference_mode`` (optionally autocast and 8-view TTA) or onnxruntime, and every chunk is
committed atomically with a completion record. Memory is bounded by the chunk and prefetch sizes,
never by the input.

A run is identified by the model id, the input's identity, TTA and the temperature, so re-running
the same model on the same input resumes (or, when finished, does nothing), while a new model, new
input, new calibration or TTA setting starts a new run partition.

A run can also be fanned out: :func:`plan_run` names its chunks without running the model, workers
call ``predict(..., chunks=[...])`` on disjoint chunks (in other threads, processes or machines), and
:func:`finalize_run` writes ``complete.json`` and the summary once every chunk is committed.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipeline.catalog.parquet import ERROR_SCHEMA, Catalog, Run, prediction_schema, prob_columns
from pipeline.learn.checkpoint import checkpoint_config, load_checkpoint, model_id
from pipeline.config import Config, stable_hash
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.catalog.inputs import InputReader, Record, check_image, open_input, plan_chunks
from pipeline.runtime import compute_threads as inference_threads, resolve_device
from pipeline.io import atomic_write_json, read_json
from pipeline.layout import StageRun
from pipeline.data.transforms import d4_views, eval_batch_transform

CALIBRATION_FILE = "calibration.json"
EXIT_PARTIAL = 3
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _say(message: str) -> None:
    print(f"astroflow predict: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ calibration and identity


def resolve_calibration(calibration: Path | None, checkpoint: Path, mid: str, tta: bool) -> tuple[float, str]:
    """(temperature, where it came from): the given file, else ``calibration.json`` beside the checkpoint, else 1.

    A file fitted for another model, or with another TTA setting, is refused: its temperature would
    rescale scores it was never fitted on.
    """
    path = Path(calibration) if calibration is not None else Path(checkpoint).parent / CALIBRATION_FILE
    if not path.is_file():
        if calibration is not None:
            raise DataError(f"{path}: calibration file not found")
        return 1.0, f"none ({path} not found): temperature 1, probabilities are uncalibrated"
    cal = read_json(path)
    t = cal.get("temperature") if isinstance(cal, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise DataError(f"{path}: field 'temperature' must be a positive number, got {t!r}")
    if cal.get("model_id") not in (None, mid):
        raise CheckpointError(f"{path}: calibration is for model {cal['model_id']!r}, not {mid!r}; re-run calibrate")
    if "tta" in cal and cal.get("enabled", True) and bool(cal["tta"]) != tta:
        raise ConfigError(f"{path}: temperature was fitted with tta={bool(cal['tta'])} but predict.tta is {tta}")
    return float(t), str(path)


def make_run_id(mid: str, identity: dict[str, Any], tta: bool, temperature: float) -> str:
    """Deterministic, so a restart finds its own partition; starts with a letter so no reader takes it for a number."""
    return "r" + stable_hash({"model_id": mid, "input": identity, "tta": tta, "temperature": temperature})


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


# ------------------------------------------------------------------ inference backends


class _TorchEngine:
    def __init__(self, model: torch.nn.Module, device: torch.device, amp: str) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.amp = amp

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(self.device.type, dtype=_AMP[self.amp]) if self.amp in _AMP else contextlib.nullcontext()
        with ctx:
            return self.model(x).float()


class _OnnxEngine:
    def __init__(self, path: Path, device: torch.device, threads: int = 0) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]
        return torch.from_numpy(out).float()


def scores(engine: _TorchEngine | _OnnxEngine, x: torch.Tensor, *, tta: bool, temperature: float) -> np.ndarray:
    """Calibrated class probabilities (float64), computed exactly as ``evaluate``/``calibrate`` score.

    With TTA the 'logits' are the log mean probability over the 8 views, and the temperature divides
    those, which is what ``calibrate`` fitted it on.
    """
    x = engine.to_device(x)
    if tta:
        views = torch.stack([engine.logits(v).log_softmax(dim=1) for v in d4_views(x)])
        z = torch.logsumexp(views, dim=0) - math.log(len(views))
    else:
        z = engine.logits(x)
    return torch.softmax(z.double().cpu() / temperature, dim=1).numpy()


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
    engine: _TorchEngine | _OnnxEngine, batches: Iterable[_Decoded], streams: int, *, tta: bool, temperature: float, num_classes: int
) -> Iterator[tuple[_Decoded, np.ndarray]]:
    """``(batch, probabilities)`` in input order, with up to ``streams`` batches scored at once in threads.

    onnxruntime and torch release the GIL while they compute, so the streams run in parallel.
    """

    def score(dec: _Decoded) -> np.ndarray:
        if not len(dec.x):
            return np.zeros((0, num_classes))
        with torch.inference_mode():  # thread-local: entered in the thread that scores
            return scores(engine, dec.x, tta=tta, temperature=temperature)

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


def _onnx_model(checkpoint: Path, mid: str, out_root: Path, notes: list[str]) -> Path:
    """An ONNX file of this very model: ``<checkpoint>.onnx`` if it matches, else one exported into the catalog."""
    from pipeline.score.export import export_onnx, onnx_metadata

    for candidate in (checkpoint.with_suffix(".onnx"), out_root / "models" / f"{mid}.onnx"):
        if candidate.is_file() and onnx_metadata(candidate).get("astroflow.model_id") == mid:
            return candidate
    target = out_root / "models" / f"{mid}.onnx"
    notes.append(f"no ONNX export of model {mid} found; exported one to {target}")
    _say(notes[-1])
    return export_onnx(checkpoint, target)


# ------------------------------------------------------------------ tables


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


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


@dataclass
class _ChunkState:
    chunk_id: str
    num_batches: int
    parts: dict[int, tuple[list[Record], np.ndarray]] = field(default_factory=dict)


# ------------------------------------------------------------------ the stage


@dataclass
class _Setup:
    """What every entry point derives from (config, checkpoint, input) before touching the catalog."""

    payload: dict[str, Any]
    model_cfg: Config
    mid: str
    class_names: list[str]
    temperature: float
    reader: InputReader
    run_id: str
    catalog: Catalog
    meta: dict[str, Any]
    notes: list[str]


def _setup(cfg: Config, checkpoint: Path, input_path: Path | None, out_root: Path, calibration: Path | None, shards_dir: Path | None) -> _Setup:
    pc = cfg.predict
    notes: list[str] = []
    payload = load_checkpoint(checkpoint)
    model_cfg = checkpoint_config(payload, checkpoint)
    mid = model_id(checkpoint)
    class_names = list(payload["class_names"])
    temperature, cal_source = resolve_calibration(calibration, checkpoint, mid, pc.tta)
    if temperature == 1.0 and cal_source.startswith("none"):
        notes.append(f"calibration: {cal_source}")
        _say(notes[-1])
    reader = open_input(input_path, pc.input_kind, shards_dir=shards_dir)
    identity = reader.identity
    run_id = make_run_id(mid, identity, pc.tta, temperature)
    catalog = Catalog(out_root)
    catalog.ensure_classes(class_names)
    meta = {
        "model_id": mid,
        "model_name": payload["model_name"],
        "checkpoint": str(checkpoint.resolve()),
        "class_names": class_names,
        "input": reader.describe(),
        "input_identity": identity,
        "chunk_size": pc.chunk_size,
        "tta": pc.tta,
        "temperature": temperature,
        "calibration": cal_source,
    }
    return _Setup(payload, model_cfg, mid, class_names, temperature, reader, run_id, catalog, meta, notes)


def _run_chunk_size(run: Run, configured: int, notes: list[str]) -> int:
    chunk_size = int(run.meta["chunk_size"])
    if chunk_size != configured:
        notes.append(f"run {run.run_id} keeps the chunk_size it started with, {chunk_size} (predict.chunk_size is {configured})")
        _say(notes[-1])
    return chunk_size


def _num_chunks(reader: InputReader, chunk_size: int) -> int:
    """Chunk count from the item index alone (nothing decoded), as ``plan_chunks`` would cut it."""
    try:
        n = sum(1 for _ in reader.items())
    finally:
        reader.close()
    return math.ceil(n / chunk_size)


def _committed(run: Run, reader: InputReader, chunk_size: int) -> dict[int, dict[str, Any]]:
    """Completion records of this input's chunks (a record with another chunk id is redone, not counted)."""
    key = reader.input_key(chunk_size)
    return {i: rec for i, rec in run.completed().items() if rec.get("chunk_id") == f"{key}-{i:06d}"}


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
) -> RunPlan:
    """Create (or find) the run of this model on this input and list its chunks, without running the model.

    Creating the run here fixes its start time and chunk size before any worker joins it.
    """
    checkpoint, out_root = Path(checkpoint), Path(out_root)
    s = _setup(cfg, checkpoint, input_path, out_root, calibration, shards_dir)
    with s.catalog.join_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, cfg.predict.chunk_size, s.notes)
        num_chunks = _num_chunks(s.reader, chunk_size)
        done = _committed(run, s.reader, chunk_size)
        return RunPlan(
            run_id=s.run_id,
            model_id=s.mid,
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
    s = _setup(cfg, checkpoint, input_path, out_root, calibration, shards_dir)
    if chunks is not None:
        return _predict_chunks(cfg, checkpoint, out_root, s, chunks, progress)
    notes = s.notes
    start = time.perf_counter()
    with s.catalog.open_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, pc.chunk_size, notes)
        if run.complete is not None:
            s.reader.close()
            stats = {"written": 0, "errors": 0, "new_chunks": 0}
            notes.append(
                f"nothing to do: model {s.mid} already classified this input in run {s.run_id}; the catalog is unchanged"
            )
            _say(notes[-1])
            status = "up_to_date"
        else:
            stats = _run_chunks(cfg, run, s, checkpoint, out_root, chunk_size, None, progress)
            status = "complete" if stats["new_chunks"] else "up_to_date"
            if not run.completed():
                notes.append(f"the input holds no images: {s.reader.describe()}")
                _say(notes[-1])
            elif not stats["new_chunks"]:
                notes.append(f"nothing to do: every chunk of run {s.run_id} was already committed")
                _say(notes[-1])
        return _finish(cfg, run, s, stats, status, time.perf_counter() - start, out_root)


def _predict_chunks(cfg: Config, checkpoint: Path, out_root: Path, s: _Setup, chunks: Sequence[int], progress: bool) -> dict[str, Any]:
    selected = sorted({int(i) for i in chunks})
    if any(i < 0 for i in selected):
        raise DataError(f"chunk indices must be >= 0, got {selected}")
    start = time.perf_counter()
    with s.catalog.join_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, cfg.predict.chunk_size, s.notes)
        pending = set(selected) - set(_committed(run, s.reader, chunk_size))
        if run.complete is not None or not pending:
            s.reader.close()
            stats = {"written": 0, "errors": 0, "new_chunks": 0}
        else:
            stats = _run_chunks(cfg, run, s, checkpoint, out_root, chunk_size, pending, progress)
    new = stats["new_chunks"]
    if not new:
        s.notes.append(f"nothing to do: chunk(s) {selected} of run {s.run_id} were already committed")
        _say(s.notes[-1])
    return {
        "run_id": s.run_id,
        "model_id": s.mid,
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
    s = _setup(cfg, checkpoint, input_path, out_root, calibration, shards_dir)
    start = time.perf_counter()
    with s.catalog.open_run(s.run_id, s.meta) as run:
        chunk_size = _run_chunk_size(run, cfg.predict.chunk_size, s.notes)
        num_chunks = _num_chunks(s.reader, chunk_size)
        missing = sorted(set(range(num_chunks)) - set(_committed(run, s.reader, chunk_size)))
        if missing:
            raise DataError(
                f"run {s.run_id}: {len(missing)} of {num_chunks} chunk(s) not committed ({_index_list(missing)}); "
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
            s.notes.append(f"the input holds no images: {s.reader.describe()}")
            _say(s.notes[-1])
        elif status == "up_to_date":
            s.notes.append(f"nothing to do: run {s.run_id} was already complete")
            _say(s.notes[-1])
        worker_s = sum(float(r.get("elapsed_s") or 0) for r in chunk_results)
        return _finish(cfg, run, s, stats, status, worker_s + time.perf_counter() - start, out_root)


def _index_list(indices: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices) - limit} more)" if len(indices) > limit else "")


def _finish(cfg: Config, run: Run, s: _Setup, stats: dict[str, Any], status: str, elapsed: float, out_root: Path) -> dict[str, Any]:
    """Mark the run complete, write and print its summary (called with every chunk committed, under the run lock)."""
    pc = cfg.predict
    summary = _summary(run, s.class_names, pc.low_confidence, stats, elapsed)
    summary.update(status=status, backend=pc.backend, notes=s.notes, catalog=str(out_root))
    summary["summary_path"] = str(run.write_summary(summary))
    _print_summary(summary)
    return summary


def _run_chunks(
    cfg: Config,
    run: Run,
    s: _Setup,
    checkpoint: Path,
    out_root: Path,
    chunk_size: int,
    selected: set[int] | None,
    progress: bool,
) -> dict[str, int]:
    """Decode, classify and commit every chunk the run has not committed yet (only ``selected`` ones if given)."""
    pc = cfg.predict
    reader, payload, mid, notes = s.reader, s.payload, s.mid, s.notes
    class_names = s.class_names
    img_size = int(payload["img_size"])
    schema = prediction_schema(class_names)
    records = run.completed()
    done = set(_committed(run, reader, chunk_size))
    const = {"model_id": mid, "tta": pc.tta, "temperature": s.temperature, "run_ts": run.started_at}
    device = resolve_device(pc.device, "predict.device")
    if done and selected is None:
        notes.append(f"resuming run {run.run_id}: {len(done)} chunk(s) already committed")
        _say(notes[-1])
    last = max(selected) if selected else None

    states: dict[int, _ChunkState] = {}
    planned: set[int] = set()
    stats = {"written": 0, "errors": 0, "new_chunks": 0}

    def specs() -> Iterator[tuple[int, int, list[Any]]]:
        for plan in plan_chunks(reader, chunk_size, done=done):
            if last is not None and plan.index > last:
                return
            if selected is not None and plan.index not in selected:
                continue
            planned.add(plan.index)
            nb = math.ceil(len(plan.items) / pc.batch_size)
            states[plan.index] = _ChunkState(plan.chunk_id, nb)
            for b in range(nb):
                yield plan.index, b, plan.items[b * pc.batch_size : (b + 1) * pc.batch_size]

    decoder = _BatchDecoder(reader, img_size, s.model_cfg.train.input_range)
    loader = torch.utils.data.DataLoader(
        decoder,
        sampler=specs(),
        batch_size=None,
        collate_fn=_identity,
        num_workers=pc.workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)  # workers fork here, before the model is built, so they never carry it
    n_threads = inference_threads(pc.threads, pc.workers)
    streams = inference_streams(pc.streams, n_threads, device)
    stream_threads = max(1, n_threads // streams)
    stats["threads"], stats["streams"] = n_threads, streams
    if pc.backend == "onnx":
        if pc.amp != "none":
            notes.append("predict.amp is ignored by the onnx backend")
        engine: _TorchEngine | _OnnxEngine = _OnnxEngine(_onnx_model(checkpoint, mid, out_root, notes), device, stream_threads)
    else:
        from pipeline.learn.checkpoint import build_model

        engine = _TorchEngine(build_model(payload, path=checkpoint), device, pc.amp)

    done_items = sum(int(records[i].get("num_items", 0)) for i in done) if selected is None else 0
    total = reader.num_items if selected is None else None
    bar = tqdm(total=total, initial=done_items, desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    threads = torch.get_num_threads()
    # With onnxruntime, torch only glues (softmax of a few logits): one torch thread, because its idle OpenMP
    # threads spin on the cores onnxruntime's threads need (measured: 2-thread ORT 1,100 -> 1,900 img/s).
    torch.set_num_threads(1 if pc.backend == "onnx" else stream_threads)
    try:
        for dec, probs in score_stream(engine, batches, streams, tta=pc.tta, temperature=s.temperature, num_classes=len(class_names)):
            state = states[dec.chunk]
            state.parts[dec.batch] = (dec.records, probs)
            bar.update(len(dec.records))
            if len(state.parts) == state.num_batches:
                _commit(run, dec.chunk, states.pop(dec.chunk), schema, class_names, const, stats)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        reader.close()
        del batches
    if states:
        raise DataError(f"chunks {sorted(states)} of run {run.run_id} were planned but never completed")
    if selected is not None and (absent := sorted(selected - planned - done)):
        raise DataError(f"run {run.run_id} has no chunk(s) {_index_list(absent)}: the input ends before them (chunks of {chunk_size} items)")
    return stats


def _commit(
    run: Run, index: int, state: _ChunkState, schema: pa.Schema, class_names: list[str], const: dict[str, Any], stats: dict[str, int]
) -> None:
    good: list[Record] = []
    bad: list[Record] = []
    probs = []
    for b in range(state.num_batches):
        recs, p = state.parts[b]
        good.extend(r for r in recs if r.error is None)
        bad.extend(r for r in recs if r.error is not None)
        probs.append(p)
    table = _prediction_table(good, np.concatenate(probs), schema, class_names, const)
    errors = _error_table(bad, const)
    if run.commit(index, state.chunk_id, table, errors, {}) is None:
        return  # another worker of the run committed it first; its rows stand
    stats["written"] += table.num_rows
    stats["errors"] += errors.num_rows
    stats["new_chunks"] += 1


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
        "temperature": meta["temperature"],
        "calibration": meta["calibration"],
        "num_chunks": len(records),
        "num_skipped_chunks": len(records) - stats["new_chunks"],
        "num_new_chunks": stats["new_chunks"],
        "num_written": stats["written"],
        "num_errors_new": stats["errors"],
        "num_predicted": sum(int(r["num_predictions"]) for r in records.values()),
        "num_errors": sum(int(r["num_errors"]) for r in records.values()),
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
    _say(head)
    width = max((len(c) for c in s["class_counts"]), default=0)
    for name, n in s["class_counts"].items():
        print(f"  {name:<{width}}  {n}", file=sys.stderr)
    if s["num_errors"]:
        _say(f"{s['num_errors']} input(s) could not be classified: see {Path(s['catalog']) / 'errors'}")
    _say(f"summary: {s['summary_path']}")


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``predict`` stage: ``predict.input`` (None: ``shard``'s test split) into the catalog at ``run.out``."""
    from pipeline.score.calibrate import CALIBRATION_FILE as CALIBRATED
    from pipeline.learn.train import BEST

    source = run.cfg.predict.input
    input_path = None if source is None else (run.workdir / Path(source).expanduser())
    calibration = run.inputs["calibrate"] / CALIBRATED
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

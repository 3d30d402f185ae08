"""Flow ``nightly-catalog``: classify what arrived in the inbox with the production model.

Each top-level entry of ``schedule.inbox`` (a Galaxy10-schema HDF5 file, a shard directory or
``.tar``, a folder of cutouts, a Zoobot CSV/Parquet catalog) is one input, identified by its name,
size and mtime (for a directory: every file's). Inputs whose identity is not yet in
``<catalog>/inbox_state.json`` are new. Each new input is planned (``pipeline.predict.plan_run``: its run
and chunks, no model run), then every chunk not yet committed becomes one Prefect task
(``predict(..., chunks=[i])``), so a Dask task runner spreads even one large input over a cluster;
when all of an input's chunks succeeded, ``finalize_run`` writes its run summary and the input is
recorded as processed. ``predict`` is idempotent per (input chunk, model), so a failed or killed run is
simply run again: it redoes the chunks that are missing and adds no duplicate rows.

Two runs at once are kept apart twice over: a Prefect global concurrency limit of one slot (plus a
deployment concurrency limit, ``flows/serve.py``) and an ``flock`` on ``<catalog>/.nightly.lock``,
which also guards runs started outside Prefect's bookkeeping.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import config_from_parameters
from pipeline import predict as predict_stage_fn
from pipeline import registry as reg
from pipeline.config import Config, PredictConfig, RegistryConfig, ScheduleConfig, stable_hash
from pipeline.errors import AstroflowError, DataError
from pipeline.inputs import detect_kind
from pipeline.io import atomic_write_json, read_json
from pipeline.layout import Layout

FLOW_NAME = "nightly-catalog"
SECTIONS = ("predict", "schedule", "registry")
CONCURRENCY_LIMIT = "astroflow-nightly-catalog"
STATE_FILE = "inbox_state.json"
LOCK_FILE = ".nightly.lock"
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".lock")
"""Names of uploads in progress, never inputs."""
LOCAL_TASKS = 2
"""Tasks the default (thread) runner runs at once: each chunk task loads its own model and already uses every core."""
RESULT_KEYS = ("run_id", "model_id", "status", "num_written", "num_predicted", "num_errors", "num_chunks", "num_skipped_chunks", "class_counts")


class NightlyBusy(AstroflowError):
    """Another nightly run kept the catalog locked for longer than ``schedule.lock_timeout_s``."""


class NightlyIncomplete(AstroflowError):
    """Some inputs failed; they stay unrecorded, so the next run (or a re-run) retries them."""


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
        listing, newest = [], path.stat().st_mtime
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for fn in sorted(filenames):
                st = os.stat(os.path.join(dirpath, fn))
                listing.append((os.path.relpath(os.path.join(dirpath, fn), path), st.st_size, st.st_mtime_ns))
                newest = max(newest, st.st_mtime)
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


# ------------------------------------------------------------------ tasks


def _predict_args(cfg: Config, checkpoint: str, calibration: str | None, input_path: str, catalog_root: str) -> dict[str, Any]:
    return {
        "cfg": cfg,
        "checkpoint": Path(checkpoint),
        "input_path": Path(input_path),
        "out_root": Path(catalog_root),
        "calibration": Path(calibration) if calibration else None,
    }


@task(name="plan-input", cache_policy=NO_CACHE)
def plan_input(cfg: Config, checkpoint: str, calibration: str | None, input_path: str, catalog_root: str) -> predict_stage_fn.RunPlan:
    """The input's run and the chunks it still lacks, so each can be its own task (nothing is classified)."""
    plan = predict_stage_fn.plan_run(**_predict_args(cfg, checkpoint, calibration, input_path, catalog_root))
    get_run_logger().info(
        "%s: run %s, %d chunk(s) of %d, %d to classify", input_path, plan.run_id, plan.num_chunks, plan.chunk_size, len(plan.pending)
    )
    return plan


@task(name="classify-chunk", cache_policy=NO_CACHE)
def classify_chunk(
    cfg: Config, checkpoint: str, calibration: str | None, input_path: str, catalog_root: str, chunk: int
) -> dict[str, Any]:
    """``pipeline.predict`` on one chunk of one input; a chunk already committed (a retry, a race) writes nothing."""
    logger = get_run_logger()
    if cfg.predict.workers and multiprocessing.current_process().daemon:
        # Dask worker processes are daemonic and may not start DataLoader workers.
        logger.info("running in a daemonic process (a Dask worker): predict.workers=0 for this chunk")
        cfg = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"workers": 0})})
    result = predict_stage_fn.predict(**_predict_args(cfg, checkpoint, calibration, input_path, catalog_root), chunks=[chunk], progress=False)
    logger.info("%s chunk %d: run %s %s, %d rows written", input_path, chunk, result["run_id"], result["status"], result["num_written"])
    return result


@task(name="finalize-input", cache_policy=NO_CACHE)
def finalize_input(
    cfg: Config, checkpoint: str, calibration: str | None, input_path: str, catalog_root: str, chunk_results: list[dict[str, Any]]
) -> dict[str, Any]:
    """Mark the input's run complete and write its summary, once every chunk is committed."""
    summary = predict_stage_fn.finalize_run(
        **_predict_args(cfg, checkpoint, calibration, input_path, catalog_root), chunk_results=chunk_results
    )
    get_run_logger().info(
        "%s: run %s %s, %d rows written now, %d classified in total, %d failed",
        input_path, summary["run_id"], summary["status"], summary["num_written"], summary["num_predicted"], summary["num_errors"],
    )
    return {k: summary.get(k) for k in RESULT_KEYS}


# ------------------------------------------------------------------ the flow


def _ensure_concurrency_limit() -> None:
    """Create the one-slot global limit if missing (a flow acquiring a missing limit would not wait)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(CONCURRENCY_LIMIT, 1)


def _catalog_rows(catalog_root: Path) -> int:
    from pipeline.catalog import PREDICTIONS, predictions_dataset

    if not (catalog_root / PREDICTIONS).is_dir():
        return 0
    return int(predictions_dataset(catalog_root).count_rows())


def _classify_new(cfg: Config, layout: Layout, flow_run_id: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    catalog_root = layout.resolve(cfg.predict.output)
    inbox = layout.resolve(cfg.schedule.inbox)
    prod = reg.production_dir(layout.resolve(cfg.registry.root))
    if prod is None:
        raise reg.RegistryError(f"{layout.resolve(cfg.registry.root)}: no production model; run the retrain flow first")
    checkpoint = prod / reg.MODEL_FILE
    calibration = prod / reg.CALIBRATION_FILE
    state = load_state(catalog_root)
    new, skipped = scan_inbox(inbox, state["inputs"], cfg.schedule.inbox_settle_s)
    logger.info("production model %s; inbox %s: %d new input(s), %d skipped", prod.name, inbox, len(new), len(skipped))
    cal = str(calibration) if calibration.is_file() else None

    def args(e: InboxEntry) -> tuple[Config, str, str | None, str, str]:
        return cfg, str(checkpoint), cal, e.path, str(catalog_root)

    done: list[dict[str, Any]] = []
    failed: dict[str, dict[str, Any]] = {}

    def fail(e: InboxEntry, what: str, exc: BaseException) -> None:
        logger.error("input %s failed (%s): %s", e.name, what, exc)
        failed.setdefault(e.key, {"input": e.name, "error": f"{what}: {type(exc).__name__}: {exc}"[:500]})

    def finish(e: InboxEntry, chunk_results: list[dict[str, Any]]) -> None:
        try:
            result = finalize_input.with_options(task_run_name=f"finalize {e.name}")(*args(e), chunk_results)
        except Exception as exc:
            fail(e, "finalize", exc)
            return
        state["inputs"][e.key] = {
            **e.identity,
            **result,
            "processed_at": dt.datetime.now(dt.UTC).isoformat(),
            "flow_run_id": flow_run_id,
        }
        save_state(catalog_root, state)
        done.append({"input": e.name, **result})

    # Plan every input, then fan out one task per pending chunk; an input is finalised and recorded as
    # soon as its last chunk succeeded, and not at all if one failed (the next run redoes only that chunk).
    plans = {plan_input.with_options(task_run_name=f"plan {e.name}").submit(*args(e)): e for e in new}
    owner: dict[PrefectFuture[dict[str, Any]], tuple[InboxEntry, int]] = {}
    remaining: dict[str, int] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    ready: list[InboxEntry] = []
    for future in as_completed(list(plans)):
        entry = plans[future]
        try:
            plan = future.result()
        except Exception as exc:
            fail(entry, "plan", exc)
            continue
        remaining[entry.key], results[entry.key] = len(plan.pending), []
        for i in plan.pending:
            name = f"classify {entry.name} chunk {i} of {plan.num_chunks}"
            owner[classify_chunk.with_options(task_run_name=name).submit(*args(entry), i)] = (entry, i)
        if not plan.pending:
            ready.append(entry)
    for entry in ready:
        finish(entry, [])
    for future in as_completed(list(owner)):
        entry, i = owner[future]
        try:
            results[entry.key].append(future.result())
        except Exception as exc:
            fail(entry, f"chunk {i}", exc)
        remaining[entry.key] -= 1
        if not remaining[entry.key] and entry.key not in failed:
            finish(entry, results[entry.key])
    return {
        "model_id": prod.name,
        "inbox": str(inbox),
        "catalog": str(catalog_root),
        "new_inputs": len(new),
        "classified": sorted(done, key=lambda r: r["input"]),
        "failed": sorted(failed.values(), key=lambda r: r["input"]),
        "skipped": skipped,
        "rows_written": sum(int(r["num_written"]) for r in done),
        "catalog_rows": _catalog_rows(catalog_root),
    }


def _publish(summary: dict[str, Any]) -> None:
    """The run's summary in the UI: a markdown overview and a per-input table."""
    rows = [
        {"input": r["input"], "status": r["status"], "rows_written": r["num_written"], "classified": r["num_predicted"],
         "errors": r["num_errors"], "run_id": r["run_id"]}
        for r in summary["classified"]
    ]
    rows += [{"input": r["input"], "status": "failed", "error": r["error"]} for r in summary["failed"]]
    rows += [{"input": r["input"], "status": "skipped", "error": r["reason"]} for r in summary["skipped"]]
    counts: dict[str, int] = {}
    for r in summary["classified"]:
        for name, n in (r.get("class_counts") or {}).items():
            counts[name] = counts.get(name, 0) + int(n)
    lines = [
        "# Nightly catalog",
        "",
        f"Production model `{summary['model_id']}`; inbox `{summary['inbox']}`; catalog `{summary['catalog']}`.",
        "",
        "| new inputs | classified | failed | skipped | rows added | catalog rows |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {summary['new_inputs']} | {len(summary['classified'])} | {len(summary['failed'])} | {len(summary['skipped'])} "
        f"| {summary['rows_written']} | {summary['catalog_rows']} |",
    ]
    if counts:
        lines += ["", "| predicted class (new inputs) | rows |", "|---|---:|"]
        lines += [f"| {name} | {n} |" for name, n in counts.items()]
    if summary["failed"]:
        lines += ["", "Failed inputs are retried by the next run (or re-run this flow now)."]
    create_markdown_artifact(key="nightly-catalog-summary", markdown="\n".join(lines), description="nightly catalog run")
    if rows:
        create_table_artifact(key="nightly-catalog-inputs", table=rows, description="inputs seen by this run")


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


@flow(
    name=FLOW_NAME,
    description="classify new inbox inputs with the production model into the Parquet catalog",
    task_runner=ThreadPoolTaskRunner(max_workers=LOCAL_TASKS),
)
def nightly_catalog(
    predict: PredictConfig = PredictConfig(),
    schedule: ScheduleConfig = ScheduleConfig(),
    registry: RegistryConfig = RegistryConfig(),
    base_params: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """Classify the inputs that arrived since the last run; fails (after recording the rest) if any input failed."""
    layout = Layout(Path(workdir).resolve())
    cfg = config_from_parameters(base_params, layout.root, dict(zip(SECTIONS, (predict, schedule, registry))))
    timeout = cfg.schedule.lock_timeout_s
    _ensure_concurrency_limit()
    with concurrency(CONCURRENCY_LIMIT, occupy=1, timeout_seconds=timeout):
        with catalog_lock(layout.resolve(cfg.predict.output), timeout):
            summary = _classify_new(cfg, layout, _flow_run_id())
    _publish(summary)
    if summary["failed"]:
        names = ", ".join(r["input"] for r in summary["failed"])
        raise NightlyIncomplete(f"{len(summary['failed'])} input(s) failed ({names}); the others are in the catalog; re-run to retry")
    return summary


def dask_task_runner(address: str | None = None, n_workers: int = 2) -> Any:
    """A Dask task runner: the given scheduler, else a local cluster of ``n_workers`` single-threaded processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})

"""The one fan-out of catalog runs: each input's chunks as separate calls on an executor (inline, threads, Dask).

:func:`classify_inputs` plans every input (its run and the chunks it lacks), submits one call per pending
chunk, and finalises an input (publishing its run, ``docs/catalog.md``) only when all of its chunks succeeded.
It serves ``astroflow predict --dask ADDRESS`` (:func:`predict_on_dask`), ``astroflow nightly`` (inline, or
``--dask ADDRESS``) and the ``nightly-catalog`` Prefect flow, whose task runner (threads or
``prefect_dask.DaskTaskRunner``) runs the same :data:`STEPS` as Prefect tasks. Only the ``Submit`` differs.

On a worker, the steps take the model from :func:`cached_model`: one load per process, so one per Dask
worker however many chunks it runs. A chunk lost with its worker is rerun by the Dask scheduler elsewhere
(up to ``distributed.scheduler.allowed-failures`` times); chunk commits are idempotent (a chunk whose
completion record exists writes nothing, files are named by chunk index), so a rerun never duplicates rows.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline.catalog import predict
from pipeline.config import Config
from pipeline.errors import AstroflowError, ConfigError
from pipeline.runtime import available_cores
from pipeline.score.trained_model import TrainedModel

log = logging.getLogger(__name__)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
LOCAL_PREFIX = "local"
"""``--dask local`` or ``local:N``: start a local cluster of N worker processes instead of joining a scheduler."""


class DistributedRunFailed(AstroflowError):
    """Some chunks failed (or their workers were lost too often); committed chunks are kept for a re-run."""


# ------------------------------------------------------------------ executors


class Outcome(Protocol[T_co]):
    """What ``submit`` returns: a ``concurrent.futures.Future``, a Dask or a Prefect future all fit."""

    def result(self) -> T_co: ...


class Submit(Protocol):
    """Run ``fn(*args)`` somewhere (inline, a thread, a Dask worker, a Prefect task); ``name`` labels it for people."""

    def __call__(self, fn: Callable[..., T], /, *args: Any, name: str) -> Outcome[T]: ...


def run_inline(fn: Callable[..., T], /, *args: Any, name: str) -> Future[T]:
    """The sequential executor: run now, keep the result or the exception for ``result()``."""
    future: Future[T] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def dask_submit(client: Any) -> Submit:
    """``Submit`` on a ``dask.distributed.Client``: every call a new task (never deduplicated), keyed by its name."""

    def submit(fn: Callable[..., T], /, *args: Any, name: str) -> Outcome[T]:
        return client.submit(fn, *args, key=f"{name} [{uuid.uuid4().hex[:8]}]", pure=False)

    return submit


def local_cluster_kwargs(n_workers: int) -> dict[str, Any]:
    """A local cluster of ``n_workers`` single-threaded processes sharing this machine's cores for torch."""
    threads = max(1, available_cores() // max(1, n_workers))
    return {
        "n_workers": n_workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
    }


def _local_workers(address: str) -> int | None:
    """N of ``local:N`` (``local``: one per core), None for a scheduler address."""
    if address != LOCAL_PREFIX and not address.startswith(LOCAL_PREFIX + ":"):
        return None
    count = address.partition(":")[2] or str(available_cores())
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--dask {address}: expected a scheduler address (tcp://host:8786), local or local:N with N >= 1")
    return int(count)


@contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A client of the scheduler at ``address``, or of a local cluster started for ``local[:N]`` and closed after."""
    from distributed import Client, LocalCluster

    n_workers = _local_workers(address)
    if n_workers is not None:
        with LocalCluster(**local_cluster_kwargs(n_workers)) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"--dask {address}: no Dask scheduler answered ({type(exc).__name__}: {exc})") from None
    with client:
        yield client


# ------------------------------------------------------------------ one model per worker


_MODEL_LOCK = threading.Lock()
_LOADS: dict[str, int] = {}


@functools.lru_cache(maxsize=2)
def _load(path: str, size: int, mtime_ns: int) -> TrainedModel:
    _LOADS[path] = _LOADS.get(path, 0) + 1
    return TrainedModel.load(path)


def cached_model(checkpoint: Path) -> TrainedModel:
    """The checkpoint's model, loaded once per process (a Dask worker) while the file is unchanged.

    Two models at most are kept, so a long-lived worker follows a newly promoted model without growing.
    """
    path = Path(checkpoint)
    if not path.is_file():
        return TrainedModel.load(path)  # the checkpoint error names the file
    st = path.stat()
    with _MODEL_LOCK:
        return _load(str(path.resolve()), st.st_size, st.st_mtime_ns)


def model_loads() -> dict[str, int]:
    """Checkpoint loads by :func:`cached_model` in this process, by path (``client.run(model_loads)`` counts per worker)."""
    return dict(_LOADS)


def _on_dask_worker() -> bool:
    dd = sys.modules.get("distributed")
    if dd is None:
        return False
    try:
        dd.get_worker()
    except ValueError:
        return False
    return True


def worker_config(cfg: Config) -> Config:
    """``cfg`` as a worker runs it: no DataLoader processes in a daemonic process (a Dask worker may not start
    them), and on a Dask worker the torch threads it was given (``OMP_NUM_THREADS``: 1 per process by Dask's
    default) instead of every core, so worker processes on one machine do not oversubscribe it."""
    import torch

    updates: dict[str, Any] = {}
    if cfg.predict.workers and multiprocessing.current_process().daemon:
        updates["workers"] = 0
    if not cfg.predict.threads and _on_dask_worker():
        updates["threads"] = torch.get_num_threads()
    return cfg.model_copy(update={"predict": cfg.predict.model_copy(update=updates)}) if updates else cfg


# ------------------------------------------------------------------ steps (each one executor call)


class Input(Protocol):
    """One input of a fan-out: a name for people and logs, a path (None: the test split of ``Job.shards_dir``)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str | None: ...


@dataclass(frozen=True)
class Target:
    """An input given by its path (``astroflow predict --dask``)."""

    name: str
    path: str | None


@dataclass(frozen=True)
class Job:
    """What every step needs besides the input: config, model, calibration and the catalog root."""

    cfg: Config
    checkpoint: Path
    calibration: Path | None
    catalog: Path
    shards_dir: Path | None = None

    @property
    def model_id(self) -> str:
        """The registry id of a registered model (its candidate directory's name)."""
        return self.checkpoint.parent.name

    def predict_args(self, entry: Input) -> dict[str, Any]:
        """The arguments of ``pipeline.catalog.predict``'s entry points, with this process's cached model."""
        return {
            "cfg": worker_config(self.cfg),
            "checkpoint": self.checkpoint,
            "input_path": Path(entry.path) if entry.path is not None else None,
            "out_root": self.catalog,
            "calibration": self.calibration,
            "shards_dir": self.shards_dir,
            "model": cached_model(self.checkpoint),
        }


def plan_input(job: Job, entry: Input) -> predict.RunPlan:
    """The input's run and the chunks it still lacks, so each can be submitted on its own (nothing is classified)."""
    return predict.plan_run(**job.predict_args(entry))


def classify_chunk(job: Job, entry: Input, chunk: int) -> dict[str, Any]:
    """One chunk of one input; a chunk already committed (a retry, a rerun of a lost worker's task) writes nothing."""
    return predict.predict(**job.predict_args(entry), chunks=[chunk], progress=False)


def finalize_input(job: Job, entry: Input, chunk_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Publish the input's run and write its summary, once every chunk is committed."""
    return predict.finalize_run(**job.predict_args(entry), chunk_results=chunk_results)


STEPS = (plan_input, classify_chunk, finalize_input)
"""Every function a fan-out hands to ``submit``: an executor may wrap each once (the flow makes them Prefect tasks)."""


# ------------------------------------------------------------------ the fan-out


class Ledger(Protocol):
    """Where a fan-out reports each input: finalised (``record``) or failed (``fail``, the first failure only)."""

    logger: logging.Logger | logging.LoggerAdapter[Any]

    def fail(self, entry: Any, what: str, exc: BaseException) -> None: ...

    def record(self, entry: Any, result: dict[str, Any]) -> None: ...


@dataclass
class Results:
    """A ledger that keeps the finalised summaries and the failures (``astroflow predict --dask``)."""

    logger: logging.Logger | logging.LoggerAdapter[Any] = log
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def fail(self, entry: Input, what: str, exc: BaseException) -> None:
        self.failed.append(f"{entry.name}: {what}: {type(exc).__name__}: {exc}")

    def record(self, entry: Input, result: dict[str, Any]) -> None:
        self.done.append(result)


def classify_inputs(job: Job, inputs: Sequence[Input], submit: Submit, ledger: Ledger) -> None:
    """Plan every input at once, then one call per pending chunk; finalise each input whose chunks all succeeded."""
    plans = [(e, submit(plan_input, job, e, name=f"plan {e.name}")) for e in inputs]
    fanouts = []
    for entry, planned in plans:
        try:
            plan = planned.result()
        except Exception as exc:
            ledger.fail(entry, "plan", exc)
            continue
        ledger.logger.info(
            "%s: run %s, %d chunk(s) of %d, %d to classify", entry.name, plan.run_id, plan.num_chunks, plan.chunk_size, len(plan.pending)
        )
        chunks = {
            i: submit(classify_chunk, job, entry, i, name=f"classify {entry.name} chunk {i} of {plan.num_chunks}")
            for i in plan.pending
        }
        fanouts.append((entry, chunks))
    for entry, chunks in fanouts:
        _complete_input(job, entry, chunks, submit, ledger)


def _complete_input(job: Job, entry: Input, chunks: dict[int, Outcome[dict[str, Any]]], submit: Submit, ledger: Ledger) -> None:
    """Wait for the input's chunks; finalise and record it only when every one of them succeeded."""
    results, ok = [], True
    for i, outcome in chunks.items():
        try:
            results.append(outcome.result())
        except Exception as exc:
            ledger.fail(entry, f"chunk {i}", exc)
            ok = False
            continue
        done = results[-1]
        ledger.logger.info("%s chunk %d: run %s %s, %d rows written", entry.name, i, done["run_id"], done["status"], done["num_written"])
    if not ok:
        return
    try:
        result = submit(finalize_input, job, entry, results, name=f"finalize {entry.name}").result()
    except Exception as exc:
        ledger.fail(entry, "finalize", exc)
        return
    ledger.record(entry, result)


def predict_on_dask(
    address: str,
    cfg: Config,
    checkpoint: Path,
    input_path: Path | None,
    out_root: Path,
    *,
    calibration: Path | None = None,
    shards_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``astroflow predict --dask ADDRESS``: one input's chunks as tasks on the cluster; returns the run summary.

    Every worker needs the input, the checkpoint and the catalog root at the same paths (a shared file system).
    ``progress`` logs each finished chunk to stderr.
    """
    job = Job(cfg, Path(checkpoint).resolve(), calibration, Path(out_root).resolve(), shards_dir)
    target = Target(str(input_path) if input_path is not None else "the test split", str(input_path) if input_path is not None else None)
    results = Results(logging.getLogger("astroflow.predict"))
    if progress and not results.logger.handlers:
        results.logger.addHandler(logging.StreamHandler(sys.stderr))
        results.logger.setLevel(logging.INFO)
    with dask_client(address) as client:
        classify_inputs(job, [target], dask_submit(client), results)
    if results.failed:
        raise DistributedRunFailed(f"{results.failed[0]} (committed chunks are kept: run the same command again to finish)")
    return results.done[0]


def predictor(address: str | None) -> Callable[..., dict[str, Any]]:
    """``pipeline.catalog.predict.predict`` (``address`` None), else the same call on the Dask cluster at ``address``."""
    return predict.predict if address is None else functools.partial(predict_on_dask, address)

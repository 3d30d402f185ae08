"""Flow ``nightly-catalog``: ``pipeline.catalog.nightly.run_nightly`` with each step a Prefect task.

The library does the work (``docs/orchestration.md``, "The nightly schedule"): scan the inbox, plan each
new input, classify every pending chunk, finalize, record, through the one fan-out
``pipeline.catalog.distributed.classify_inputs`` that ``astroflow nightly --dask`` and ``astroflow predict --dask``
use too; here its ``Submit`` makes each step a Prefect task on the flow's task runner. The flow adds what Prefect gives: parameters as UI forms, one task per
chunk (so a Dask task runner spreads even one large input over a cluster), a global concurrency limit
of one slot (plus a deployment concurrency limit, ``flows/serve.py``) in front of the library's catalog
``flock``, and the run's summary as artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows import config_from_parameters
from pipeline.catalog import distributed, nightly
from pipeline.config import PredictConfig, RegistryConfig, ScheduleConfig
from pipeline.errors import AstroflowError
from pipeline.layout import Layout

FLOW_NAME = "nightly-catalog"
SECTIONS = ("predict", "schedule", "registry")
CONCURRENCY_LIMIT = "astroflow-nightly-catalog"
LOCAL_TASKS = 2
"""Tasks the default (thread) runner runs at once: each chunk task already uses every core (the model is loaded once per process)."""
TASKS: dict[Callable[..., Any], Task[..., Any]] = {
    step: task(step, name=step.__name__.replace("_", "-"), cache_policy=NO_CACHE) for step in distributed.STEPS
}
"""Each library step as a Prefect task, made once."""


class NightlyIncomplete(AstroflowError):
    """Some inputs failed; they stay unrecorded, so the next run (or a re-run) retries them."""


def submit_task(fn: Callable[..., Any], /, *args: Any, name: str) -> PrefectFuture[Any]:
    """``pipeline.catalog.nightly.Submit`` for Prefect: the step as a task run named ``name``, on the flow's task runner."""
    return TASKS[fn].with_options(task_run_name=name).submit(*args)


def _ensure_concurrency_limit() -> None:
    """Create the one-slot global limit if missing (a flow acquiring a missing limit would not wait)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(CONCURRENCY_LIMIT, 1)


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
    """Classify the inputs that arrived since the last run; fails (after recording the rest) if any input failed.

    Args:
        predict: Catalog inference (stage predict, astroflow predict, nightly); a field left out keeps the params file's value.
        schedule: The nightly catalog: schedule, inbox, catalog and the artifact store.
        registry: The model registry; the production model classifies.
        base_params: The params file the sections apply to, relative to workdir; none: the built-in defaults.
        workdir: The directory relative paths in the configuration resolve against.
    """
    layout = Layout(Path(workdir).resolve())
    cfg = config_from_parameters(base_params, layout.root, dict(zip(SECTIONS, (predict, schedule, registry))))
    _ensure_concurrency_limit()
    with concurrency(CONCURRENCY_LIMIT, occupy=1, timeout_seconds=cfg.schedule.lock_timeout_s):
        summary = nightly.run_nightly(cfg, layout, submit_task, logger=get_run_logger(), flow_run_id=_flow_run_id())
    _publish(summary)
    if summary["failed"]:
        names = ", ".join(r["input"] for r in summary["failed"])
        raise NightlyIncomplete(f"{len(summary['failed'])} input(s) failed ({names}); the others are in the catalog; re-run to retry")
    return summary


def dask_task_runner(address: str | None = None, n_workers: int = 2) -> Any:
    """A Dask task runner: the given scheduler, else the local cluster ``astroflow ... --dask local:N`` starts."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs=distributed.local_cluster_kwargs(n_workers))

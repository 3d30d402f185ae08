"""``astroflow serve``: both deployments against the Prefect server in ``PREFECT_API_URL``.

``train-pipeline/retrain`` has no schedule: it is run from the UI (or the API) with edited parameters.
``nightly-catalog/nightly-catalog`` runs on ``schedule.nightly_cron`` in ``schedule.timezone`` with a
deployment concurrency limit of one (later runs queue). Both deployments' default parameters are the
params file's sections, so the UI's run form opens pre-filled with params.yaml; restart ``astroflow
serve`` after editing that file. Without ``PREFECT_API_URL`` Prefect starts a temporary server for the
process; it runs with usage analytics off unless ``PREFECT_SERVER_ANALYTICS_ENABLED`` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.layout import Layout

RETRAIN = "retrain"
NIGHTLY = "nightly-catalog"


def deployment_parameters(cfg: Config, sections: tuple[str, ...], base_params: Path | None, workdir: Path) -> dict[str, Any]:
    """A deployment's default parameters: the named sections in full, the params file and the workdir."""
    full = cfg.to_dict()
    return {**{name: full[name] for name in sections}, "base_params": str(base_params) if base_params else None, "workdir": str(workdir)}


def build_deployments(cfg: Config, layout: Layout, params_path: Path | None) -> list[Any]:
    """The two runner deployments (not yet registered with the server)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows import nightly_catalog as nightly_mod
    from flows import train_pipeline as train_mod

    if params_path is None and (layout.root / "params.yaml").is_file():
        params_path = layout.root / "params.yaml"
    params_path = Path(params_path).resolve() if params_path else None
    retrain = train_mod.train_pipeline.to_deployment(
        name=RETRAIN,
        parameters=deployment_parameters(cfg, train_mod.SECTIONS, params_path, layout.root),
        description="Retrain from the UI: edit any section, unchanged stages come from the cache.",
        tags=["astroflow"],
    )
    nightly_flow = nightly_mod.nightly_catalog
    if cfg.schedule.dask_address:
        nightly_flow = nightly_flow.with_options(task_runner=nightly_mod.dask_task_runner(cfg.schedule.dask_address))
    nightly = nightly_flow.to_deployment(
        name=NIGHTLY,
        schedules=[Cron(cfg.schedule.nightly_cron, timezone=cfg.schedule.timezone)],
        parameters=deployment_parameters(cfg, nightly_mod.SECTIONS, params_path, layout.root),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Classify new inbox inputs with the production model into the Parquet catalog.",
        tags=["astroflow"],
    )
    return [retrain, nightly]


def temporary_server_settings() -> contextlib.AbstractContextManager[Any]:
    """Analytics off for the temporary server Prefect starts without ``PREFECT_API_URL`` (unless set explicitly)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    if PREFECT_API_URL.value() or PREFECT_SERVER_ANALYTICS_ENABLED.name in os.environ:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: False})


def serve(cfg: Config, layout: Layout, params_path: Path | None) -> None:
    """Register both deployments and run their flow runs from this process until interrupted."""
    from prefect import serve as prefect_serve

    with temporary_server_settings():
        prefect_serve(*build_deployments(cfg, layout, params_path))

"""End to end against a real ``prefect server`` on 127.0.0.1: ``astroflow serve``, a retrain triggered through
the REST API with an edited parameter form (what the UI posts), the nightly schedule, and two nightly runs.

The server, the serve process and every flow run are separate processes with their own PREFECT_HOME; the
test only talks HTTP to the server and reads the files the runs leave in the working directory.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pipeline.score import registry as reg
from pipeline.catalog.parquet import read_predictions
from pipeline.learn.checkpoint import model_id
from pipeline.score.metrics import significant
from conftest import make_galaxy10_h5

pytestmark = pytest.mark.slow

PARAMS = {
    "data": {"synthetic": {"num_images": 120, "image_size": 32}},
    "shard": {"workers": 1, "max_samples_per_shard": 50},
    "model": {"name": "astroformer_pico", "img_size": 32},
    "train": {
        "epochs": 1, "batch_size": 16, "warmup_epochs": 0, "workers": 0, "shuffle_buffer": 64, "randaugment": None,
        "mixup_alpha": 0.0, "device": "cpu", "max_steps_per_epoch": 2,
    },
    "evaluate": {"workers": 0, "batch_size": 32, "device": "cpu"},
    "predict": {"workers": 0, "batch_size": 16, "chunk_size": 16, "device": "cpu"},
    "schedule": {"inbox_settle_s": 0, "lock_timeout_s": 120},
    "registry": {"min_value": 0.0, "min_margin_over_majority": 0.0},  # a 2-step toy model; the floor has its own tests
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the process group we started (serve pauses its schedules), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class RetryBusy(httpx.HTTPTransport):
    """Retry 503s as Prefect's own client does: the server answers 503 when SQLite is busy (retryable)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(8):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(min(0.5 * 2**attempt, 8))
        return super().handle_request(request)


def _wait(what: str, check: Any, timeout: float, procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{log.read_text()[-4000:]}")
        value = check()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {name}\n{log.read_text()[-3000:]}" for name, _, log in procs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class Stack:
    """The running server and serve processes, and an HTTP client for the server's API."""

    def __init__(self, workdir: Path, api: httpx.Client, procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
        self.workdir, self.api, self.procs = workdir, api, procs

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        return _wait(what, check, timeout, self.procs)

    def deployment(self, name: str) -> dict[str, Any]:
        r = self.api.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def run(self, deployment: dict[str, Any], parameters: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Create a flow run the way the UI's run form does, then wait for a terminal state."""
        r = self.api.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
        if not r.is_success:
            tails = "\n".join(f"--- {name}\n{log.read_text()[-3000:]}" for name, _, log in self.procs)
            pytest.fail(f"create_flow_run answered {r.status_code}: {r.text[:500]}\n{tails}")
        run_id = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            run = self.api.get(f"/flow_runs/{run_id}").json()
            return run if run["state"]["type"] in TERMINAL else None

        return self.wait(f"flow run {run_id} of {deployment['name']}", finished, timeout)

    def artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "CREATED_DESC", "limit": 100, "offset": 0}
        r = self.api.post("/artifacts/filter", json=body)
        r.raise_for_status()
        return {a["key"]: a for a in r.json()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    workdir = root / "work"
    workdir.mkdir()
    (workdir / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "TQDM_DISABLE": "1",
    }
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, cmd: list[str]) -> None:
        log = root / f"{name}.log"
        fh = open(log, "wb")
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, proc, log))

    api = httpx.Client(base_url=api_url, timeout=30, transport=RetryBusy())
    try:
        start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)])

        def healthy() -> bool:
            try:
                return api.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        _wait("the Prefect server", healthy, 150, procs)
        start("serve", [sys.executable, "-m", "pipeline.cli", "serve", "--workdir", str(workdir)])
        stack = Stack(workdir, api, procs)
        for name in ("train-pipeline/retrain", "nightly-catalog/nightly-catalog"):
            stack.wait(f"deployment {name}", lambda n=name: api.get(f"/deployments/name/{n}").status_code == 200, 120)
        yield stack
    finally:
        for _, proc, _ in reversed(procs):
            _stop(proc)
        api.close()


@pytest.fixture(scope="module")
def retrained(stack: Stack) -> dict[str, Any]:
    """A retrain run with ``train.epochs`` edited in the form the UI opens pre-filled with the deployment's values."""
    retrain = stack.deployment("train-pipeline/retrain")
    form = copy.deepcopy(retrain["parameters"])
    assert form["train"]["epochs"] == 1 and form["base_params"] == str(stack.workdir / "params.yaml")
    form["train"]["epochs"] = 2
    return stack.run(retrain, form, timeout=240)


def test_retrain_from_the_ui_form_promotes_and_publishes(stack: Stack, retrained: dict[str, Any]) -> None:
    retrain = stack.deployment("train-pipeline/retrain")
    assert not retrain["schedules"]
    schema = retrain["parameter_openapi_schema"]
    assert {"data", "validate", "split", "shard", "model", "train", "evaluate", "calibrate", "registry"} <= set(schema["properties"])
    assert "epochs" in schema["definitions"]["TrainConfig"]["properties"]  # the UI renders a form per section

    ui = httpx.get(str(stack.api.base_url).removesuffix("/api/") + "/", timeout=30)
    assert ui.status_code == 200 and "<html" in ui.text.lower()  # the UI a person opens to press Run

    run = retrained
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["train"]["epochs"] == 2

    registry = stack.workdir / "registry"
    prod = reg.production_dir(registry)
    assert prod is not None
    metrics, lineage = reg.read_record(prod)
    assert lineage["flow_run_id"] == run["id"] and lineage["config"]["train"]["epochs"] == 2
    assert model_id(prod / reg.MODEL_FILE) == lineage["model_id"] == prod.name
    history = reg.history(registry)
    assert [(h["candidate_id"], h["promote"]) for h in history] == [(prod.name, True)]

    arts = stack.artifacts(run["id"])
    assert {"retrain-metrics", "retrain-per-class", "retrain-report", "retrain-confusion-matrix", "model-registry", "model-card"} <= set(arts)
    table = {row["metric"]: row["value"] for row in json.loads(arts["retrain-metrics"]["data"])}
    assert table["top1"] == significant(metrics["top1"])  # artifacts round to 4 significant digits
    assert arts["retrain-confusion-matrix"]["data"].startswith("data:image/png;base64,")
    assert prod.name in arts["model-registry"]["data"] and "promoted" in arts["model-registry"]["data"]


def test_nightly_runs_on_cron_and_adds_only_new_inputs(stack: Stack, retrained: dict[str, Any]) -> None:
    nightly = stack.deployment("nightly-catalog/nightly-catalog")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    assert retrained["state"]["type"] == "COMPLETED", "the nightly run needs the retrained production model"
    inbox = stack.workdir / "inbox"
    inbox.mkdir()
    make_galaxy10_h5(inbox / "night1_a.h5", n=17, size=32, seed=1)
    make_galaxy10_h5(inbox / "night1_b.h5", n=23, size=32, seed=2)

    first = stack.run(nightly, {}, timeout=150)
    assert first["state"]["type"] == "COMPLETED", first["state"]
    catalog = stack.workdir / "catalog"  # schedule.catalog, never the predict stage's data/catalog
    df = read_predictions(catalog)
    assert len(df) == 40
    assert sorted(Path(p).name for p in df["source_file"].unique()) == ["night1_a.h5", "night1_b.h5"]
    assert set(df["model_id"]) == {reg.production_id(stack.workdir / "registry")}
    summary = stack.artifacts(first["id"])["nightly-catalog-summary"]["data"]
    assert "| 2 | 2 | 0 | 0 | 40 | 40 |" in summary

    second = stack.run(nightly, {}, timeout=150)
    assert second["state"]["type"] == "COMPLETED", second["state"]
    assert len(read_predictions(catalog)) == 40
    assert "| 0 | 0 | 0 | 0 | 0 | 40 |" in stack.artifacts(second["id"])["nightly-catalog-summary"]["data"]

    # The server's scheduler has turned the cron into upcoming runs at 02:00 UTC.
    server_log = next(log for name, _, log in stack.procs if name == "server")

    def scheduled() -> list[dict[str, Any]]:
        if "Can't evaluate bulk DML statement" in server_log.read_text():
            pytest.fail("the Prefect server's scheduler crashes with SQLAlchemy >= 2.1 (Prefect 3.8): pin sqlalchemy<2.1")
        body = {"deployments": {"id": {"any_": [nightly["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": 10, "offset": 0}
        return stack.api.post("/flow_runs/filter", json=body).json()

    upcoming = stack.wait("the scheduler to create the nightly runs", scheduled, 90)
    starts = [dt.datetime.fromisoformat(r["expected_start_time"]).astimezone(dt.UTC) for r in upcoming]
    assert all((t.hour, t.minute) == (2, 0) for t in starts) and starts[0] > dt.datetime.now(dt.UTC)

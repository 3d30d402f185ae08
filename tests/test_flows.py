"""The Prefect flows under ``prefect_test_harness``: stage cache hits and misses, promotion, artifacts,
the nightly catalog (new inputs only, re-runs, a failed chunk, two runs at once, the Dask task runner with per-chunk tasks).

The train tests share tiny real training runs (synthetic 32 px images, astroformer_pico, one epoch, under
torchrun), made in one fixed order by one fixture so that the tests pass in any order; the nightly tests use a
workdir of their own with a random-weights production model, and an inbox and catalog of their own each.
Everything that runs a flow is marked slow.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from flows import config_from_parameters
from flows.nightly_catalog import dask_task_runner, nightly_catalog
from flows.train_pipeline import train_pipeline
from pipeline.score import registry as reg
from pipeline.catalog.parquet import read_predictions
from pipeline.config import (
    ModelConfig,
    ScheduleConfig,
    SplitConfig,
    TrainConfig,
    load_config,
)
from pipeline.errors import ConfigError
from pipeline.score.metrics import significant
from pipeline.layout import Layout
from pipeline.orchestrate.graph import stored_stages
from pipeline.orchestrate.launch import TrainingFailed
from pipeline.orchestrate.store import MARKER, StageDir, plan_keys
from pipeline.catalog.nightly import LOCK_FILE, STATE_FILE, NightlyBusy, catalog_lock
from conftest import install_production_model, make_galaxy10_h5

TINY = {
    "data": {"synthetic": {"num_images": 120, "image_size": 32}},
    "shard": {"workers": 1, "max_samples_per_shard": 50},
    "model": {"name": "astroformer_pico", "img_size": 32},
    "train": {
        "epochs": 1, "batch_size": 16, "warmup_epochs": 0, "workers": 0, "shuffle_buffer": 64,
        "randaugment": None, "mixup_alpha": 0.0, "device": "cpu", "max_steps_per_epoch": 2,
    },
    "evaluate": {"workers": 0, "batch_size": 32, "device": "cpu"},
    "predict": {"workers": 0, "batch_size": 16, "chunk_size": 16, "device": "cpu"},
    "registry": {"metric": "top1", "min_value": 0.0, "min_margin_over_majority": 0.0},  # a 2-step toy model
    "schedule": {"inbox_settle_s": 0, "lock_timeout_s": 120},
}


# ------------------------------------------------------------------ no Prefect needed


STAGES = [s.name for s in stored_stages()]


def test_parameters_override_only_the_fields_they_set(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "split": {"seed": 3}}))
    cfg = config_from_parameters("params.yaml", tmp_path, {"train": TrainConfig(epochs=3), "split": SplitConfig()})
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 16 and cfg.model.img_size == 32  # the rest of train and other sections: the file
    assert cfg.split.seed == 3  # a section left at its default does not reset the file's values
    # A section parsed from JSON (how the UI and the API send it) counts its keys as set.
    ui = TrainConfig.model_validate({"epochs": 2, "batch_size": 8})
    cfg = config_from_parameters(str(tmp_path / "params.yaml"), tmp_path, {"train": ui})
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup_epochs) == (2, 8, 0)
    with pytest.raises(ConfigError, match="params file not found"):
        config_from_parameters("missing.yaml", tmp_path, {})


# ------------------------------------------------------------------ flows against a test server


@pytest.fixture(scope="module")
def harness() -> Any:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flows")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    return root


Run = tuple[Any, dict[str, Any]]
"""A flow run's final state and its result ({} unless it completed)."""


def _run_train(workdir: Path, **sections: Any) -> Run:
    state = train_pipeline(base_params="params.yaml", workdir=str(workdir), return_state=True, **sections)
    return state, (state.result() if state.is_completed() else {})


@dataclass(frozen=True)
class TrainRuns:
    """The training flow runs the tests below look at, and the production model after those that may move it."""

    first: Run
    production_after_first: str | None
    same: Run  # the same parameters again: every stage from the store
    same_again: Run  # and once more: Prefect's own cache records answer
    seed: Run  # train.seed=1: the data stages reused, train and everything after it rebuilt
    production_after_seed: str | None
    failed: Run  # a model name that does not exist: the train stage fails


@pytest.fixture(scope="module")
def train_runs(harness: Any, workdir: Path) -> TrainRuns:
    """Every training run of this module, in one fixed order, whichever test asks first.

    The runs share the stage store, the registry and Prefect's cache records, so each run's outcome depends on
    the runs before it (a repeated run reads the store only until Prefect holds records for its keys; a better
    retrained model takes production). Made here, in this order, every test below holds in any test order.
    """
    first = _run_train(workdir)
    after_first = reg.production_id(workdir / "registry")
    same = _run_train(workdir)
    same_again = _run_train(workdir)
    seed = _run_train(workdir, train=TrainConfig(seed=1))
    after_seed = reg.production_id(workdir / "registry")
    failed = _run_train(workdir, model=ModelConfig(name="no_such_model_anywhere"))
    return TrainRuns(first, after_first, same, same_again, seed, after_seed, failed)


def _flow_run_id(state: Any) -> UUID:
    return state.state_details.flow_run_id


def _logs(flow_run_id: UUID, needle: str, expected: int, timeout: float = 30) -> list[str]:
    """Log messages of a flow run (and its tasks) containing ``needle``, waiting for the batched log shipper."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        found: list[str] = []
        with get_client(sync_client=True) as client:
            for offset in range(0, 10_000, 200):
                page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset)
                found += [log.message for log in page if needle in log.message]
                if len(page) < 200:
                    break
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    """The run's artifacts by key, flow-level and task-level, as the UI's artifact tab lists them."""
    from prefect.client.orchestration import get_client

    # The client's read_artifacts sends task_runs={} when given any filter, which keeps only task-level artifacts.
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "CREATED_DESC", "limit": 100, "offset": 0}
    with get_client(sync_client=True) as client:
        arts = client.request("POST", "/artifacts/filter", json=body).json()
    return {a["key"]: a for a in arts}


@pytest.mark.slow
def test_first_run_builds_every_stage_and_promotes(train_runs: TrainRuns, workdir: Path) -> None:
    state, result = train_runs.first
    assert state.is_completed(), state.message
    assert {s["how"] for s in result["stages"].values()} == {"built"}
    for stage, s in result["stages"].items():
        assert StageDir(workdir / "cache", stage, s["key"]).complete() is not None
    assert result["promoted"] and result["decision"]["reason"].startswith("there is no production model yet")
    assert train_runs.production_after_first == result["model_id"] == result["production_id"]
    from pipeline.learn.checkpoint import model_id

    registered = workdir / "registry" / reg.CANDIDATES / result["model_id"]
    assert model_id(registered / reg.MODEL_FILE) == result["model_id"]
    metrics, lineage = reg.read_record(registered)
    assert lineage["stage_keys"] == {s: v["key"] for s, v in result["stages"].items()}
    assert lineage["config_hash"] == result["config_hash"]
    prepared = StageDir(workdir / "cache", "prepare", result["stages"]["prepare"]["key"]).complete()
    assert lineage["data_hash"] == prepared["summary"]["data_hash"]
    assert lineage["metrics"]["top1"] == metrics["top1"] == result["metrics"]["top1"]
    assert "git_commit" in lineage["code"] and lineage["config"]["train"]["epochs"] == 1

    arts = _artifacts(_flow_run_id(state))
    assert {"retrain-metrics", "retrain-per-class", "retrain-report", "retrain-confusion-matrix", "model-registry", "model-card"} <= set(arts)
    table = {row["metric"]: row["value"] for row in json.loads(arts["retrain-metrics"]["data"])}
    assert table["top1"] == significant(metrics["top1"]) and table["macro_f1"] == significant(metrics["macro_f1"])
    per_class = json.loads(arts["retrain-per-class"]["data"])
    assert [row["class"] for row in per_class] == list(metrics["per_class"])
    shown = [*table.values(), *(v for row in per_class for v in row.values() if isinstance(v, float))]
    assert all(v == significant(v) for v in shown), shown  # 4 significant digits, not 0.5720000000000001
    assert arts["retrain-learning-curves"]["data"].startswith("data:image/png;base64,")
    assert "data:image/png;base64," in arts["retrain-report"]["data"] and "Per class" in arts["retrain-report"]["data"]
    assert arts["retrain-confusion-matrix"]["data"].startswith("data:image/png;base64,")
    assert len(_logs(_flow_run_id(state), "cache miss", len(STAGES))) == len(STAGES)


@pytest.mark.slow
def test_same_parameters_reuse_every_artifact(train_runs: TrainRuns) -> None:
    _, first = train_runs.first
    markers = {s: (Path(v["path"]) / MARKER).read_text() for s, v in first["stages"].items()}
    state, second = train_runs.same
    assert state.is_completed(), state.message
    assert {s["how"] for s in second["stages"].values()} == {"hit"}
    assert {s: v["key"] for s, v in second["stages"].items()} == {s: v["key"] for s, v in first["stages"].items()}
    assert {s: (Path(v["path"]) / MARKER).read_text() for s, v in second["stages"].items()} == markers  # nothing rebuilt
    hits = _logs(_flow_run_id(state), "cache hit", len(STAGES))
    assert sorted(m.split()[2] for m in hits) == sorted(STAGES)
    assert second["model_id"] == first["model_id"] and not second["promoted"]
    assert "already" in second["decision"]["reason"]

    # From now on Prefect holds records under the same keys: its own cache answers, tasks end "Cached".
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    state3, third = train_runs.same_again
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[_flow_run_id(state3)])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=50,
        )
    by_name = {r.name.split("-")[0]: r.state.name for r in runs}
    assert all(by_name[s] == "Cached" for s in STAGES), by_name
    assert third["model_id"] == first["model_id"]


@pytest.mark.slow
def test_training_parameter_reuses_shards_and_retrains(train_runs: TrainRuns, workdir: Path) -> None:
    _, first = train_runs.first
    state, result = train_runs.seed
    assert state.is_completed(), state.message
    assert {s: v["how"] == "hit" for s, v in result["stages"].items()} == {
        "prepare": True, "validate": True, "shard": True, "train": False, "calibrate": False, "evaluate": False,
    }
    assert result["stages"]["shard"]["path"] == first["stages"]["shard"]["path"]
    assert result["model_id"] != first["model_id"]
    # The rule, not the test, decides which model is in production: strictly better on registry.metric wins.
    better = result["metrics"]["top1"] > first["metrics"]["top1"]
    assert result["promoted"] is better
    assert train_runs.production_after_seed == (result["model_id"] if better else first["model_id"])
    assert (workdir / "registry" / reg.CANDIDATES / result["model_id"] / reg.LINEAGE_FILE).is_file()


@pytest.mark.slow
def test_failed_training_fails_the_task_with_the_log_tail(train_runs: TrainRuns, workdir: Path) -> None:
    state, _ = train_runs.failed
    assert state.is_failed()
    with pytest.raises(TrainingFailed) as err:
        state.result()
    assert "exited with status" in str(err.value) and "no_such_model_anywhere" in str(err.value)
    cfg = config_from_parameters("params.yaml", workdir, {"model": ModelConfig(name="no_such_model_anywhere")})
    key = plan_keys(cfg, Layout(workdir))["train"]
    assert StageDir(workdir / "cache", "train", key).complete() is None
    assert not [p for p in (workdir / "cache" / "train").iterdir() if p.name.startswith(f".{key}.") and p.name.endswith(".tmp")]


# ------------------------------------------------------------------ nightly catalog


@pytest.fixture(scope="module")
def nightly_workdir(harness: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir of its own with a random-weights production model, so the nightly tests need no training run."""
    root = tmp_path_factory.mktemp("nightly")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    install_production_model(root / "registry")
    return root


def _nightly(workdir: Path, name: str, **kw: Any) -> tuple[Any, dict[str, Any]]:
    state = nightly_catalog(
        schedule=kw.pop("schedule", ScheduleConfig(inbox=f"inboxes/{name}", catalog=f"catalogs/{name}")),
        base_params="params.yaml",
        workdir=str(workdir),
        return_state=True,
        **kw,
    )
    return state, (state.result() if state.is_completed() else {})


def _inbox(workdir: Path, name: str, sizes: dict[str, int]) -> Path:
    inbox = workdir / "inboxes" / name
    inbox.mkdir(parents=True, exist_ok=True)
    for i, (fname, n) in enumerate(sizes.items()):
        make_galaxy10_h5(inbox / fname, n=n, size=32, seed=100 + i)
    return inbox


@pytest.mark.slow
def test_nightly_classifies_each_new_input_once(nightly_workdir: Path) -> None:
    _inbox(nightly_workdir, "once", {"a.h5": 20, "b.h5": 30})
    state, s = _nightly(nightly_workdir, "once")
    assert state.is_completed(), state.message
    catalog = nightly_workdir / "catalogs" / "once"
    df = read_predictions(catalog)
    assert len(df) == 50 == s["rows_written"] == s["catalog_rows"]
    assert sorted(Path(p).name for p in df["source_file"].unique()) == ["a.h5", "b.h5"]
    assert set(df["model_id"]) == {reg.production_id(nightly_workdir / "registry")} == {s["model_id"]}
    assert not df.duplicated(["source_file", "source_row"]).any()
    assert not (nightly_workdir / "data").exists()  # never the DVC predict stage's data/catalog
    arts = _artifacts(_flow_run_id(state))
    assert "nightly-catalog-summary" in arts and "| 2 | 2 | 0 | 0 | 50 | 50 |" in arts["nightly-catalog-summary"]["data"]

    state, s = _nightly(nightly_workdir, "once")
    assert state.is_completed() and s["new_inputs"] == 0 and s["rows_written"] == 0
    assert len(read_predictions(catalog)) == 50

    _inbox(nightly_workdir, "once", {"c.h5": 7})
    state, s = _nightly(nightly_workdir, "once")
    assert [r["input"] for r in s["classified"]] == ["c.h5"] and s["catalog_rows"] == 57


@pytest.mark.slow
def test_failed_nightly_run_is_completed_by_a_rerun(nightly_workdir: Path) -> None:
    inbox = _inbox(nightly_workdir, "rerun", {"good.h5": 12})
    (inbox / "broken.h5").write_bytes(b"not an hdf5 file at all")
    state, _ = _nightly(nightly_workdir, "rerun")
    assert state.is_failed() and "broken.h5" in state.message
    catalog = nightly_workdir / "catalogs" / "rerun"
    assert len(read_predictions(catalog)) == 12
    assert len(yaml.safe_load((catalog / STATE_FILE).read_text())["inputs"]) == 1

    make_galaxy10_h5(inbox / "broken.h5", n=9, size=32, seed=5)  # the upload is repaired
    state, s = _nightly(nightly_workdir, "rerun")
    assert state.is_completed(), state.message
    assert [r["input"] for r in s["classified"]] == ["broken.h5"]
    df = read_predictions(catalog)
    assert len(df) == 21 and not df.duplicated(["source_file", "source_row"]).any()


@pytest.mark.slow
def test_two_nightly_runs_at_once_classify_each_input_once(nightly_workdir: Path) -> None:
    _inbox(nightly_workdir, "twice", {"a.h5": 16, "b.h5": 16, "c.h5": 16})
    results: list[tuple[Any, dict[str, Any]]] = []
    threads = [threading.Thread(target=lambda: results.append(_nightly(nightly_workdir, "twice"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(state.is_completed() for state, _ in results), [state.message for state, _ in results]
    assert sorted(s["new_inputs"] for _, s in results) == [0, 3]  # the second run waited, then found nothing new
    df = read_predictions(nightly_workdir / "catalogs" / "twice")
    assert len(df) == 48 and not df.duplicated(["source_file", "source_row"]).any()


@pytest.mark.slow
def test_a_held_lock_makes_the_run_wait_then_give_up(nightly_workdir: Path) -> None:
    _inbox(nightly_workdir, "locked", {"a.h5": 4})
    catalog = nightly_workdir / "catalogs" / "locked"
    with catalog_lock(catalog, timeout_s=0):
        schedule = ScheduleConfig(inbox="inboxes/locked", catalog="catalogs/locked", lock_timeout_s=1)
        state, _ = _nightly(nightly_workdir, "locked", schedule=schedule)
    assert state.is_failed()
    with pytest.raises(NightlyBusy):
        state.result()
    assert (catalog / LOCK_FILE).exists() and not (catalog / STATE_FILE).exists()


def _task_runs(flow_run_id: UUID, prefix: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), sort=TaskRunSort.NAME_ASC, limit=200
        )
    return [r for r in runs if r.name.startswith(prefix)]


@pytest.mark.slow
def test_a_failed_chunk_is_all_a_rerun_redoes(
    nightly_workdir: Path, monkeypatch: pytest.MonkeyPatch, chunk_1_fails: None
) -> None:
    _inbox(nightly_workdir, "chunkfail", {"big.h5": 40})  # chunks of 16: rows 0-15, 16-31, 32-39
    state, _ = _nightly(nightly_workdir, "chunkfail")
    assert state.is_failed() and "big.h5" in state.message
    catalog = nightly_workdir / "catalogs" / "chunkfail"
    assert read_predictions(catalog).empty  # an incomplete run's rows are not visible ...
    staged = pq.read_table(next((catalog / "runs").glob("*/predictions")))  # ... but kept for the rerun
    assert sorted(staged["source_row"].to_pylist()) == [*range(16), *range(32, 40)]
    assert not (catalog / STATE_FILE).exists() or not json.loads((catalog / STATE_FILE).read_text())["inputs"]
    assert not list((catalog / "runs").glob("*/complete.json"))

    monkeypatch.undo()  # the worker is back
    state, s = _nightly(nightly_workdir, "chunkfail")
    assert state.is_completed(), state.message
    (row,) = s["classified"]
    assert (row["input"], row["status"], row["num_written"], row["num_skipped_chunks"], row["num_predicted"]) == ("big.h5", "complete", 16, 2, 40)
    assert [r.name for r in _task_runs(_flow_run_id(state), "classify ")] == ["classify big.h5 chunk 1 of 3"]
    df = read_predictions(catalog)
    assert sorted(df["source_row"]) == list(range(40)) and df["run_ts"].nunique() == 1


@pytest.mark.slow
def test_dask_runner_builds_the_same_catalog(nightly_workdir: Path) -> None:
    _inbox(nightly_workdir, "dask", {"a.h5": 18, "b.h5": 22})  # two chunks of predict.chunk_size=16 each
    state, threads_summary = _nightly(nightly_workdir, "dask")
    assert state.is_completed(), state.message
    on_dask = nightly_catalog.with_options(task_runner=dask_task_runner(n_workers=2))
    state = on_dask(
        schedule=ScheduleConfig(inbox="inboxes/dask", catalog="catalogs/dask-cluster"),
        base_params="params.yaml",
        workdir=str(nightly_workdir),
        return_state=True,
    )
    assert state.is_completed(), state.message
    dask_summary = state.result()
    assert dask_summary["rows_written"] == threads_summary["rows_written"] == 40
    chunk_runs = _task_runs(_flow_run_id(state), "classify ")
    assert len(chunk_runs) == 4 > dask_summary["new_inputs"] == 2  # one task per chunk, not per input
    assert all(r.state.is_completed() for r in chunk_runs)
    assert [r["num_chunks"] for r in dask_summary["classified"]] == [2, 2]
    cols = lambda df: df.drop(columns=["run_ts"]).sort_values(["source_file", "source_row"]).reset_index(drop=True)  # noqa: E731
    catalogs = nightly_workdir / "catalogs"
    pd.testing.assert_frame_equal(cols(read_predictions(catalogs / "dask")), cols(read_predictions(catalogs / "dask-cluster")))


def test_serve_builds_both_deployments(tmp_path: Path) -> None:
    from flows.serve import build_deployments

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**TINY, "schedule": {"nightly_cron": "30 3 * * 1-5", "timezone": "Europe/Berlin"}}))
    cfg = load_config(tmp_path / "params.yaml")
    retrain, nightly = build_deployments(cfg, Layout(tmp_path), None)
    assert (retrain.name, nightly.name) == ("retrain", "nightly-catalog")
    assert not retrain.schedules
    (sched,) = nightly.schedules
    assert (sched.schedule.cron, sched.schedule.timezone) == ("30 3 * * 1-5", "Europe/Berlin")
    assert nightly.concurrency_limit == 1 and nightly.concurrency_options.collision_strategy == "ENQUEUE"
    assert retrain.parameters["train"] == cfg.to_dict()["train"] and retrain.parameters["validate"] == cfg.to_dict()["validate"]
    assert retrain.parameters["base_params"] == str(tmp_path / "params.yaml")
    assert set(nightly.parameters) == {"predict", "schedule", "registry", "base_params", "workdir"}
    props = retrain._parameter_openapi_schema.properties
    assert {"data", "validate", "split", "shard", "model", "train", "evaluate", "calibrate", "registry"} <= set(props)
    assert props["train"]["$ref"].endswith("TrainConfig")



FORK_AFTER_PREFECT = """
import multiprocessing as mp
import torch
import flows
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

@flow
def one() -> int:
    return 1

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        return i

def child():
    pass

if __name__ == "__main__":
    with prefect_test_harness():
        assert one() == 1
    print(sorted(int(x) for x in torch.utils.data.DataLoader(Items(), num_workers=2)))
    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join()
    print("child exit", p.exitcode)
"""


@pytest.mark.slow
def test_forked_children_exit_cleanly_after_prefect_ran(tmp_path: Path) -> None:
    """Prefect 3.8 leaves a drain at exit that fails in fork children; flows._fork keeps their exit status 0."""
    import subprocess

    script = tmp_path / "fork_after_prefect.py"
    script.write_text(FORK_AFTER_PREFECT)
    proc = subprocess.run([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[0, 1, 2, 3, 4, 5]" in proc.stdout and "child exit 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_deployment_form_puts_model_and_train_first_and_describes_every_field(tmp_path: Path) -> None:
    from flows.serve import build_deployments
    from pipeline.config import Config

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    retrain, _ = build_deployments(load_config(tmp_path / "params.yaml"), Layout(tmp_path), None)
    schema = retrain._parameter_openapi_schema
    order = sorted(schema.properties, key=lambda name: schema.properties[name]["position"])
    assert order[:2] == ["model", "train"] and order.index("data") > order.index("registry"), order
    sections = {field.alias or name: field for name, field in Config.model_fields.items()}
    for name, prop in schema.properties.items():
        expected = sections[name].description if name in sections else prop.get("description")
        assert prop.get("description") and prop["description"] == expected, name  # the text `params --explain` prints
    undescribed = [f"{d}.{f}" for d, spec in schema.definitions.items() for f, p in spec["properties"].items() if not p.get("description")]
    assert undescribed == []
    assert list(schema.definitions["DataConfig"]["properties"])[-1] == "class_names"


def test_learning_curves_png_has_separate_loss_and_score_axes(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.learn.outputs import learning_curves_png, write_history

    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_top1": 0.2 * e, "val_macro_f1": 0.18 * e,
             "lr": 1e-3, "images_per_s": 10.0} for e in (1, 2, 3)]
    write_history(tmp_path / "history.csv", rows)
    png = tmp_path / "curves.png"
    png.write_bytes(learning_curves_png(tmp_path / "history.csv"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # two panels side by side


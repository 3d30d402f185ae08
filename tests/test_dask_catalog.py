"""``astroflow predict --dask``: a local Dask cluster of two worker processes builds the same catalog as one
process, loads the model once per worker, and loses and duplicates nothing when a worker is killed mid-run.

The model is a random-weights astroformer_pico at 32 px; the CLI runs in a subprocess as a Dask client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from pipeline.catalog.distributed import local_cluster_kwargs, model_loads
from pipeline.catalog.parquet import read_predictions
from conftest import REPO_ROOT, install_production_model, make_galaxy10_h5

PARAMS = {"predict": {"workers": 0, "batch_size": 8, "chunk_size": 8, "device": "cpu"}}


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A client of a fresh local cluster of two single-threaded worker processes."""
    from distributed import Client, LocalCluster

    with LocalCluster(**local_cluster_kwargs(2)) as lc, Client(lc) as client:
        client.wait_for_workers(2)
        yield client


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def _predict(workdir: Path, h5: Path, output: Path, *extra: str) -> subprocess.Popen[str]:
    mid = install_production_model(workdir / "registry")
    checkpoint = workdir / "registry" / "candidates" / mid / "model.pt"
    cmd = [sys.executable, "-m", "pipeline.cli", "predict", "--workdir", str(workdir), "-q",
           "--input", str(h5), "--checkpoint", str(checkpoint), "--output", str(output), *extra]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _rows(root: Path) -> pd.DataFrame:
    return read_predictions(root).drop(columns=["run_ts"]).sort_values("source_row").reset_index(drop=True)


@pytest.mark.slow
def test_two_workers_build_the_catalog_of_one_process_and_load_the_model_once_each(workdir: Path, cluster: Any) -> None:
    h5 = workdir / "survey.h5"
    make_galaxy10_h5(h5, n=60, size=32, seed=3)  # 8 chunks of 8
    local = _finish(_predict(workdir, h5, workdir / "one"))
    on_dask = _finish(_predict(workdir, h5, workdir / "two", "--dask", cluster.scheduler.address))
    assert on_dask["status"] == "complete" and on_dask["num_chunks"] == local["num_chunks"] == 8
    assert on_dask["run_id"] == local["run_id"]  # the same run: same model, input and settings
    pd.testing.assert_frame_equal(_rows(workdir / "one"), _rows(workdir / "two"))
    loads = [sum(counts.values()) for counts in cluster.run(model_loads).values()]
    assert loads == [1, 1]  # 10 tasks (plan, 8 chunks, finalize) on two workers, one model load each


@pytest.mark.slow
def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(workdir: Path, cluster: Any) -> None:
    h5 = workdir / "survey.h5"
    make_galaxy10_h5(h5, n=480, size=32, seed=4)  # 60 chunks of 8
    pids = cluster.run(os.getpid)
    proc = _predict(workdir, h5, workdir / "cat", "--dask", cluster.scheduler.address)
    deadline = time.monotonic() + 120
    while len(list((workdir / "cat" / "runs").glob("*/chunks/*.json"))) < 4:  # the run is under way
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a worker could be killed"
        time.sleep(0.02)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    summary = _finish(proc)
    assert cluster.run(os.getpid) != pids  # the nanny started a new worker process
    assert (summary["status"], summary["num_chunks"], summary["num_predicted"]) == ("complete", 60, 480)
    df = read_predictions(workdir / "cat")
    assert sorted(df["source_row"]) == list(range(480))  # every row, exactly once

"""A real `dvc repro` in a temporary git repository holding a copy of the project."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.catalog.parquet import read_predictions
from conftest import ran_stages as _ran
from conftest import run_ok as _run

pytestmark = pytest.mark.slow


def test_dvc_repro_data_stages_noop_and_seed_change(project: Path):
    first = _run(["dvc", "repro", "shard"], project)
    assert _ran(first) == ["prepare", "validate", "shard"]
    assert (project / "data/validation/summary.md").is_file()
    assert (project / "data/shards/manifest.json").is_file()
    again = _run(["dvc", "repro", "shard"], project)
    assert _ran(again) == [], again
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro", "shard"], project)
    assert _ran(third) == ["shard"], third


def test_dvc_repro_runs_train_calibrate_evaluate_predict(project: Path):
    out = _run(["dvc", "repro"], project)
    assert _ran(out) == ["prepare", "validate", "shard", "train", "calibrate", "evaluate", "predict"], out
    assert (project / "data/train/best.pt").is_file() and (project / "data/eval/confusion.png").is_file()
    metrics = _run(["dvc", "metrics", "show", "--json"], project)
    assert "top1" in metrics and "macro_f1" in metrics and "num_predicted" in metrics
    summary = json.loads((project / "metrics/predict.json").read_text())
    catalog = read_predictions(project / "data/catalog", run=summary["run_id"])
    assert summary["num_predicted"] == len(catalog) == 16 and summary["num_errors"] == 0  # the test split: 10% of 160
    assert _ran(_run(["dvc", "repro"], project)) == []

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["predict"]["batch_size"] = 5  # re-runs the stage; same model and input: the kept catalog gets no new rows
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], project)) == ["predict"]
    again = json.loads((project / "metrics/predict.json").read_text())
    assert again["run_id"] == summary["run_id"] and again["num_written"] == 0
    assert len(read_predictions(project / "data/catalog")) == 16

"""A real `dvc repro` in a temporary git repository holding a copy of the project."""

from __future__ import annotations

import json
import re
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
    assert "top1" in metrics and "macro_f1" in metrics and "num_predicted" not in metrics
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


def _widest_line(text: str) -> int:
    return max(map(len, text.splitlines()))


def test_experiments_read_well_and_leave_git_clean(project: Path):
    """Headline metrics only, DVCLive's log for `dvc exp`, plots that render, nothing generated left for git."""
    _run(["dvc", "repro"], project)
    shown = _run(["dvc", "metrics", "show"], project)
    assert _widest_line(shown) < 200, shown
    for metric in ("top1", "macro_f1", "balanced_accuracy", "ece", "val_loss"):
        assert metric in shown, shown
    for noise in ("num_predicted", "per_class", "success"):
        assert noise not in shown, shown
    live = json.loads((project / "data/train/live/metrics.json").read_text())
    assert live["step"] == 2 and set(live) >= {"train_loss", "val_loss", "val_top1", "val_macro_f1", "lr"}

    plots = _run(["dvc", "plots", "show", "--json"], project)
    assert "Loss" in plots and "Validation accuracy" in plots and "history.csv" not in plots
    rows = (project / "data/eval/confusion_plot.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and all(re.fullmatch(r"\d [^,]+,\d [^,]+", r) for r in rows[1:]), rows[:3]

    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], project)
    assert status.split() == ["??", "dvc.lock"], status  # the README: commit dvc.lock with the code
    _run(["git", "add", "dvc.lock"], project)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"], project)

    _run(["dvc", "exp", "run", "-S", "train.epochs=3", "-n", "three-epochs"], project)
    table = _run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--csv"], project)
    assert "three-epochs" in table and "top1" in table and "val_loss" in table, table
    diff = _run(["dvc", "exp", "diff", "HEAD", "three-epochs", "--json"], project)
    assert "train.epochs" in diff and "step" in diff, diff
    after = _run(["git", "status", "--porcelain", "--untracked-files=all"], project)
    assert sorted(after.split()) == ["M", "M", "dvc.lock", "params.yaml"], after  # the applied experiment, nothing new

"""A real `dvc repro` in a temporary git repository holding a copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.catalog import read_predictions

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files + ["dvc.yaml", "params.yaml"]:
        src = ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synthetic"].update(num_images=160, image_size=48)
    params["model"].update(name="astroformer_pico", img_size=32)
    params["train"].update(epochs=2, batch_size=16, warmup_epochs=0, workers=0, shuffle_buffer=50)
    params["predict"].update(workers=0, batch_size=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    if not (repo / ".dvc").is_dir():
        _run(["dvc", "init", "-q"], repo)
    return repo


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

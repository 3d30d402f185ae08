"""The DVCLive log training writes beside history.csv: what `dvc exp show` and `dvc plots` read."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.learn.outputs import LIVE_DIR, LIVE_METRICS, write_history


def _rows(epochs: int, offset: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"epoch": e, "train_loss": 2.0 / e + offset, "val_loss": 2.1 / e, "val_top1": 0.1 * e, "val_macro_f1": 0.09 * e,
         "lr": 1e-3 / e, "images_per_s": 50.0}
        for e in range(1, epochs + 1)
    ]


def _logged(live: Path, name: str) -> list[dict[str, str]]:
    with open(live / "plots" / "metrics" / f"{name}.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_each_epoch_is_logged_once_with_the_epoch_as_step(tmp_path: Path) -> None:
    history = _rows(3)
    for epochs in (1, 2, 3, 3):  # once per epoch, then once more after the loop (as train does)
        write_history(tmp_path / "history.csv", history[:epochs])
    live = tmp_path / LIVE_DIR
    latest = json.loads((live / "metrics.json").read_text())
    assert latest["step"] == 3 and {k: latest[k] for k in LIVE_METRICS} == {k: history[-1][k] for k in LIVE_METRICS}
    for name in LIVE_METRICS:
        assert [(int(r["step"]), float(r[name])) for r in _logged(live, name)] == [(h["epoch"], h[name]) for h in history]
    assert not (live / "dvc.yaml").exists() and not (tmp_path / "dvc.yaml").exists()


def test_a_different_run_starts_the_log_over(tmp_path: Path) -> None:
    write_history(tmp_path / "history.csv", _rows(3))
    replaced = _rows(2, offset=0.5)  # a forced new run, or a resume from an older checkpoint
    write_history(tmp_path / "history.csv", replaced)
    logged = _logged(tmp_path / LIVE_DIR, "train_loss")
    assert [(int(r["step"]), float(r["train_loss"])) for r in logged] == [(h["epoch"], h["train_loss"]) for h in replaced]


def test_a_git_repository_without_dvc_gets_no_dvc_project(tmp_path: Path, monkeypatch) -> None:
    """DVCLive would `dvc init` the repository it starts in; training from inside another git repo must not."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    write_history(tmp_path / "run" / "history.csv", _rows(2))
    assert (tmp_path / "run" / "history.csv").is_file()
    assert not (tmp_path / ".dvc").exists()


def test_a_dvc_project_without_a_commit_still_trains(tmp_path: Path, monkeypatch) -> None:
    """`git init && dvc init && dvc repro` before the first commit: DVCLive cannot name a baseline; history is kept."""
    import subprocess
    import sys

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    write_history(tmp_path / "run" / "history.csv", _rows(2))
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 3

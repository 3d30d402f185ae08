"""Progress output: bars on a terminal, plain throttled lines in logs and pipes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import progress


def test_without_a_terminal_progress_is_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()  # not a tty, like a log file
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.tqdm(total=3, desc="prepare", unit="img", disable=False) as bar:
        for _ in range(3):
            bar.update(1)
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and lines, err.getvalue()
    assert lines[-1].startswith("prepare: 3/3 img (100%)")


def test_lines_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.tqdm(total=1000, desc="shard", unit="img", disable=False) as bar:  # LOG_EVERY_S apart: only the final line
        for _ in range(1000):
            bar.update(1)
    assert [line.split(" (")[0] for line in err.getvalue().splitlines()] == ["shard: 1000/1000 img"]


def test_cli_progress_in_a_log_file_has_no_carriage_returns(tmp_path: Path) -> None:
    log = tmp_path / "prepare.log"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "prepare", "--workdir", str(tmp_path),
             "--set", "data.synthetic.num_images=40", "--set", "data.synthetic.image_size=32"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "prepare: 40/40 img (100%)" in text, text


def test_every_progress_bar_goes_through_pipeline_progress() -> None:
    """A bar imported from tqdm directly would write carriage returns into logs again (training's epoch bar did)."""
    root = Path(__file__).resolve().parents[1] / "pipeline"
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "progress.py" and "from tqdm" in p.read_text()]
    assert direct == []


def test_a_bar_redrawn_every_step_is_still_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training's bar calls set_postfix each step, which redraws it: still one line per LOG_EVERY_S, plus the last."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.tqdm(total=50, desc="epoch 1/1", unit="step", disable=False, leave=False) as bar:
        for step in range(50):
            bar.set_postfix(loss=1.0 / (step + 1))
            bar.update(1)
    assert [line.split(" (")[0] for line in err.getvalue().splitlines()] == ["epoch 1/1: 50/50 step"]

"""configs/small_real.yaml, the preset for small real data, runs end to end on any Galaxy10-schema file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import pytest

from conftest import make_galaxy10_h5, run_ok
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "small_real.yaml"


def test_preset_decisions_hold() -> None:
    cfg = load_config(PRESET, ["data.path=/any"])
    # a mirror swaps clockwise and anticlockwise spirals: rotations only, in training and at test time
    assert cfg.train.rotation == "rot90" and not cfg.train.hflip and cfg.evaluate.tta
    assert cfg.train.metric == "macro_f1" and cfg.data.center_crop is not None and 0 < cfg.data.center_crop < 1
    assert cfg.compare.baseline in cfg.compare.candidates and len(cfg.compare.candidates) >= 2
    # the baseline differs from the preset in the network only
    assert set(cfg.compare.candidates[cfg.compare.baseline].set) == {"model.name"}


@pytest.mark.slow
def test_preset_runs_on_a_galaxy10_schema_file_with_other_class_names(tmp_path: Path) -> None:
    h5 = tmp_path / "survey.h5"
    make_galaxy10_h5(h5, 90, size=256, num_classes=3)
    names = ["bar", "ring", "smooth"]
    cmd = [
        sys.executable, "-m", "pipeline.cli", "run", "-q", "--params", str(PRESET), "--workdir", str(tmp_path / "w"),
        "--set", "data.source=h5", "--set", f"data.path={h5}", "--set", f"data.class_names=[{', '.join(names)}]",
        "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--set", "train.time_budget_s=null",
    ]
    run_ok(cmd, tmp_path)

    data = tmp_path / "w" / "data"
    with h5py.File(next((data / "prepared").glob("*.h5")), "r") as f:
        assert f["images"].shape[1:] == (72, 72, 3)  # the central 47 % of 256 px (121 px), resized to 72
    metrics = json.loads((data / "eval" / "metrics.json").read_text())
    assert list(metrics["per_class"]) == names and metrics["tta_views"] == 4
    assert "bar" in (data / "eval" / "model_card.md").read_text()

"""The model card: written by evaluate with every section, consistent with metrics.json, copied and shown by the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EVAL_OVERRIDES, evaluated_workspace, REPO_ROOT, SHARD_SIZE, eval_cfg, make_checkpoint, nearest_red_mean, register_gap_model

from pipeline.cli import main
from pipeline.data.shards import load_manifest
from pipeline.io import read_json
from pipeline.score import card as C
from pipeline.score import registry as reg
from pipeline.score.evaluate import evaluate

register_gap_model()
pytestmark = pytest.mark.usefixtures("one_thread")

SECTIONS = ("model", "data", "split", "evaluation", "calibration", "intended_use", "weak_classes")
HEADINGS = ("# Model card", "## Data and split", "## Test metrics", "## Calibration", "## Intended use and limits", "## Known weak classes")


def _blind_to_class_0(model: torch.nn.Module) -> None:
    """A good red-level classifier that never predicts class 0: class 0 has the lowest F1 (zero)."""
    nearest_red_mean(model, 1.0)
    with torch.no_grad():
        model.fc.bias[0] -= 1e4


@pytest.fixture(scope="module")
def workspace(red_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir as `dvc repro` leaves it (shards, best.pt, calibration.json, data/eval), the model blind to class 0."""
    return evaluated_workspace(tmp_path_factory.mktemp("card") / "wd", red_shards, _blind_to_class_0)


def test_card_matches_metrics_and_its_intervals_bracket_them(workspace: Path) -> None:
    eval_dir = workspace / "data" / "eval"
    card, metrics = read_json(eval_dir / C.CARD_JSON), read_json(eval_dir / "metrics.json")
    assert set(SECTIONS) <= set(card)
    for key in ("top1", "macro_f1", "balanced_accuracy", "ece_after"):
        m = card["evaluation"]["metrics"][key]
        assert m["value"] == metrics[key]
        assert m["low"] <= m["value"] <= m["high"] and m["low"] < m["high"], key
    cal = read_json(workspace / "data" / "calibration" / "calibration.json")
    assert card["calibration"]["temperature"] == cal["temperature"] == metrics["temperature"]
    assert card["calibration"]["ece_before"] == metrics["ece_before"] and card["calibration"]["ece_after"] == metrics["ece_after"]
    manifest = load_manifest(workspace / "data" / "shards")
    assert card["data"]["data_hash"] == manifest["data_hash"]
    assert card["split"]["seed"] == manifest["split"]["seed"]
    assert card["split"]["class_counts"]["test"] == manifest["splits"]["test"]["class_counts"]
    assert card["model"]["model_id"] == metrics["model_id"] and card["model"]["parameters"] == 3 * 10 + 10


def test_card_is_reproducible(workspace: Path, tmp_path: Path) -> None:
    """Seeded intervals and no timestamps: evaluating the same model again writes the same card, byte for byte."""
    data = workspace / "data"
    evaluate(eval_cfg(), data / "shards", data / "train" / "best.pt", tmp_path / "again",
             calibration=data / "calibration" / "calibration.json", progress=False)
    for name in C.CARD_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (data / "eval" / name).read_bytes(), name


def test_weak_classes_are_the_lowest_f1_ones(workspace: Path) -> None:
    card = read_json(workspace / "data" / "eval" / C.CARD_JSON)
    per_class = read_json(workspace / "data" / "eval" / "metrics.json")["per_class"]
    weak = card["weak_classes"]
    assert weak[0]["class"] == "Disturbed" and weak[0]["f1"] == 0.0 and "low_f1" in weak[0]["flags"]
    assert [w["f1"] for w in weak] == sorted(w["f1"] for w in weak)
    for w in weak:
        assert ("low_f1" in w["flags"]) == (per_class[w["class"]]["f1"] < C.WEAK_F1)
        assert ("low_support" in w["flags"]) == (per_class[w["class"]]["support"] < C.MIN_SUPPORT)
    markdown = (workspace / "data" / "eval" / C.CARD_MD).read_text()
    assert markdown.index("| Disturbed | 0.000") > markdown.index("## Known weak classes")


def test_weak_class_flags_follow_the_thresholds() -> None:
    per_class = {
        "strong": {"f1": 0.9, "recall": 0.9, "precision": 0.9, "support": 100},
        "poor": {"f1": 0.3, "recall": 0.2, "precision": 0.6, "support": 100},
        "rare": {"f1": 0.8, "recall": 0.8, "precision": 0.8, "support": 12},
        "poor_rare": {"f1": 0.1, "recall": 0.1, "precision": 0.1, "support": 5},
    }
    weak = C.weak_classes(per_class)
    assert [(w["class"], w["flags"]) for w in weak] == [
        ("poor_rare", ["low_f1", "low_support"]), ("poor", ["low_f1"]), ("rare", ["low_support"])
    ]


@pytest.mark.slow
def test_cli_evaluate_writes_the_card_with_every_section(workspace: Path, tmp_path: Path) -> None:
    """`astroflow evaluate` in a subprocess, on a fresh workdir with an astroformer_pico checkpoint."""
    wd = tmp_path / "wd"
    shutil.copytree(workspace / "data" / "shards", wd / "data" / "shards")
    make_checkpoint(wd / "data" / "train" / "best.pt", "astroformer_pico", img_size=SHARD_SIZE)
    sets = [f"--set={o}" for o in EVAL_OVERRIDES]
    for stage in ("calibrate", "evaluate"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", stage, "--workdir", str(wd), "-q", *sets],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    card = read_json(wd / "data" / "eval" / C.CARD_JSON)
    assert set(SECTIONS) <= set(card) and card["model"]["name"] == "astroformer_pico"
    assert card["intended_use"]["symmetry"].startswith("the 8 exact rotations and flips")
    markdown = (wd / "data" / "eval" / C.CARD_MD).read_text()
    positions = [markdown.index(h) for h in HEADINGS]
    assert positions == sorted(positions)


def _registry(wd: Path, *args: str) -> int:
    return main(["registry", *args, "--workdir", str(wd), "-q", *(f"--set={o}" for o in EVAL_OVERRIDES)])


def test_registry_copies_the_card_and_show_surfaces_it(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _registry(workspace, "register") == 0
    (row,) = reg.list_models(workspace / "registry")
    target = reg.candidate_dir(workspace / "registry", row["model_id"])
    for name in C.CARD_FILES:
        assert (target / name).read_bytes() == (workspace / "data" / "eval" / name).read_bytes()
    capsys.readouterr()
    assert _registry(workspace, "show", row["model_id"]) == 0
    shown = json.loads(capsys.readouterr().out)["card"]
    assert Path(shown["path"]) == target / C.CARD_MD
    assert shown["metrics"]["macro_f1"] == read_json(target / C.CARD_JSON)["evaluation"]["metrics"]["macro_f1"]
    assert shown["weak_classes"][0] == "Disturbed"
    assert _registry(workspace, "list") == 0
    assert capsys.readouterr().out.splitlines()[1].rstrip().endswith("yes")

    # A model registered before cards existed still lists and shows, without one.
    for name in C.CARD_FILES:
        (target / name).unlink()
    assert _registry(workspace, "show", row["model_id"]) == 0
    assert json.loads(capsys.readouterr().out)["card"] is None
    assert _registry(workspace, "list") == 0
    assert capsys.readouterr().out.splitlines()[1].rstrip().endswith("no")

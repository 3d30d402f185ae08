"""The `astroflow` command as a user runs it: one-command runs, overrides, clear errors and exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from conftest import make_galaxy10_h5


def astroflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


TINY = [
    "--set", "model.name=astroformer_pico", "--set", "model.img_size=32",
    "--set", "train.epochs=2", "--set", "train.batch_size=16", "--set", "train.warmup_epochs=0",
    "--set", "train.workers=0", "--set", "train.shuffle_buffer=64", "--set", "train.lr=0.002",
    "--set", "evaluate.workers=0",
]


@pytest.mark.slow
def test_run_on_any_galaxy10_schema_file_with_its_own_classes(tmp_path):
    src = tmp_path / "four_classes.h5"
    make_galaxy10_h5(src, n=120, size=32, num_classes=4)
    work = tmp_path / "work"
    proc = astroflow(
        "run", "-q", "--workdir", str(work),
        "--set", "data.source=h5", "--set", f"data.path={src}",
        "--set", "data.class_names=[smooth, spiral, edge_on, merger]",
        *TINY, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert set(metrics["per_class"]) == {"smooth", "spiral", "edge_on", "merger"}
    assert metrics["num_samples"] == 12
    for path in ["data/validation/summary.md", "data/shards/manifest.json", "data/train/best.pt", "data/eval/confusion.png", "params.resolved.yaml"]:
        assert (work / path).is_file(), path
    assert "stage times" in proc.stderr
    assert "stage 3/7 shard: " in proc.stderr and "stage 7/7 predict: " in proc.stderr  # the overall progress line


def test_config_errors_stop_before_any_work(tmp_path):
    proc = astroflow("run", "--workdir", str(tmp_path / "w"), "--set", "train.epcohs=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.epcohs: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "data").exists()


def test_bad_input_names_file_and_field_and_leaves_nothing(tmp_path):
    src = tmp_path / "bad.h5"
    with h5py.File(src, "w") as h5:
        h5["images"] = np.zeros((4, 8, 8, 3), np.uint8)
        h5["ans"] = np.zeros(3, np.uint8)
    proc = astroflow("prepare", "--workdir", str(tmp_path), "--set", "data.source=h5", "--set", f"data.path={src}", cwd=tmp_path)
    assert proc.returncode == 2
    assert str(src) in proc.stderr and "field 'ans'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "prepared" / "dataset.h5").exists()


def test_validation_failure_exits_1_and_blocks_sharding(tmp_path):
    src = tmp_path / "dup.h5"
    make_galaxy10_h5(src, n=40, size=16)
    with h5py.File(src, "a") as h5:
        h5["images"][5] = h5["images"][6]
    common = ["--workdir", str(tmp_path), "--set", "data.source=h5", "--set", f"data.path={src}"]
    assert astroflow("prepare", "-q", *common, cwd=tmp_path).returncode == 0
    proc = astroflow("validate", "-q", *common, cwd=tmp_path)
    assert proc.returncode == 1 and "image_duplicates" in proc.stderr
    assert json.loads((tmp_path / "data/validation/report.json").read_text())["success"] is False
    shard = astroflow("shard", "-q", *common, cwd=tmp_path)
    assert shard.returncode == 2 and "failed validation" in shard.stderr
    assert not (tmp_path / "data" / "shards").exists()


def test_models_lists_the_family_with_stack_and_size(tmp_path):
    proc = astroflow("models", "astroformer_pico", "astroformer_0", "resnet18", "--img-size", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "C-C-C-T" in proc.stdout and "resnet18" in proc.stdout


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_training_run_is_not_replaced_without_resume_or_force(tmp_path, command):
    """Forgetting --resume after a crash must not throw away the run: refuse, name both flags, touch nothing."""
    train_dir = tmp_path / "data" / "train"
    train_dir.mkdir(parents=True)
    (train_dir / "last.pt").write_bytes(b"an epoch of a long run")
    proc = astroflow(command, "-q", "--workdir", str(tmp_path), cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--resume" in lines[0] and "--force" in lines[0] and "last.pt" in lines[0]
    assert (train_dir / "last.pt").read_bytes() == b"an epoch of a long run"
    assert not (tmp_path / "data" / "prepared").exists()  # refused before any stage ran

    forced = astroflow("train", "-q", "--force", "--workdir", str(tmp_path), cwd=tmp_path)
    assert forced.returncode == 2 and "--resume" not in forced.stderr  # past the guard: now it needs shards
    assert "shards" in forced.stderr or "manifest" in forced.stderr, forced.stderr


def _all_parsers(parser: Any) -> list[Any]:
    """``parser`` and every sub-command parser below it."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for a in subs for sub in a.choices.values() for p in _all_parsers(sub))]


def test_every_command_help_has_examples_and_no_markup():
    from pipeline.cli import build_parser

    parsers = _all_parsers(build_parser())
    assert len(parsers) > 20
    for parser in parsers:
        text = parser.format_help()
        assert "``" not in text and ":class:" not in text, parser.prog
        examples = text.split("examples:\n", 1)[-1].splitlines() if "examples:\n" in text else []
        assert examples and all("astroflow " in line for line in examples), parser.prog


def test_version_and_help_from_the_command_line(tmp_path):
    version = astroflow("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"astroflow {importlib.metadata.version('astroflow')}"
    help_text = astroflow("train", "--help", cwd=tmp_path).stdout
    assert "examples:\n  astroflow train --force" in help_text and "``" not in help_text


def test_params_explain_prints_every_description_as_valid_yaml(tmp_path):
    from pipeline.config import Config

    proc = astroflow("params", "--explain", "--set", "train.epochs=7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == {**Config().to_dict(), "train": {**Config().to_dict()["train"], "epochs": 7}}
    lines = proc.stdout.splitlines()
    epochs = lines.index("  epochs: 7")
    assert lines[epochs - 1] == f"  # {Config.model_fields['train'].annotation.model_fields['epochs'].description}"
    comments = " ".join(line.strip().lstrip("# ") for line in lines if line.lstrip().startswith("#"))
    for field in Config.model_fields.values():
        assert field.description in comments


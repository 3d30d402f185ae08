"""Hostile inputs and faults, through the CLI in subprocesses: each ends in one line and exit 2, or cleans up after itself.

Issue 14 items 2 (HDF5 shapes against the file), 3 (temporaries after ``kill -9``), 8 (unwritable outputs),
9 (YAML limits, booleans for numbers) and part of 10 (checkpoint refusal, serve telemetry, docs, relative paths).
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, make_galaxy10_h5

SMALL = ["--set", "data.synthetic.num_images=60", "--set", "data.synthetic.image_size=32"]
MODEL_SIZE = 32


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def user_error(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    """Assert exit 2 with one error line and no traceback; return that line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("astroflow: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with prepared, validated and sharded synthetic data (60 images of 32 px)."""
    root = tmp_path_factory.mktemp("ws")
    for stage in ("prepare", "validate", "shard"):
        proc = cli(stage, "-q", "--workdir", str(root), *SMALL)
        assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", "astroformer_pico", img_size=MODEL_SIZE)


def copy_workspace(workspace: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(workspace, root, symlinks=True)
    return root


# ------------------------------------------------------------------ item 2: HDF5 shapes checked against the file


def forged_h5(path: Path, kind: str) -> Path:
    """A small file whose shapes declare rows that are not on disk."""
    with h5py.File(path, "w") as f:
        if kind == "petabyte":  # 1.6 KB declaring 10**9 images of 256 px: a traceback, then a segfault
            f.create_dataset("images", shape=(10**9, 256, 256, 3), dtype="u1", chunks=(1, 256, 256, 3))
            f.create_dataset("ans", shape=(10**9,), dtype="u1", chunks=(4096,))
        elif kind == "chunks-never-written":  # prepare wrote 245 MB of zeros, predict classified them
            f.create_dataset("images", shape=(20_000, 64, 64, 3), dtype="u1", chunks=(64, 64, 64, 3))
            f.create_dataset("ans", data=np.zeros(20_000, dtype="u1"))
        elif kind == "writer-died":  # an upload whose writer died after 300 of 1000 rows
            images = f.create_dataset("images", shape=(1000, MODEL_SIZE, MODEL_SIZE, 3), dtype="u1", chunks=(100, MODEL_SIZE, MODEL_SIZE, 3))
            images[:300] = 128
            f.create_dataset("ans", data=np.zeros(1000, dtype="u1"))
        elif kind == "contiguous-never-written":
            f.create_dataset("images", shape=(500, MODEL_SIZE, MODEL_SIZE, 3), dtype="u1")
            f.create_dataset("ans", data=np.zeros(500, dtype="u1"))
        elif kind == "labels-never-written":
            f.create_dataset("images", data=np.full((50, MODEL_SIZE, MODEL_SIZE, 3), 7, dtype="u1"))
            f.create_dataset("ans", shape=(50,), dtype="u1", chunks=(10,))
    return path


@pytest.mark.parametrize("command", ["prepare", "validate", "predict"])
@pytest.mark.parametrize("kind", ["petabyte", "chunks-never-written", "writer-died", "contiguous-never-written", "labels-never-written"])
def test_hdf5_rows_a_file_declares_must_be_on_disk(command: str, kind: str, tmp_path: Path, checkpoint: Path) -> None:
    work = tmp_path / "work"
    src = forged_h5(tmp_path / "forged.h5", kind)
    if command == "prepare":
        proc = cli("prepare", "-q", "--workdir", str(work), "--set", "data.source=h5", "--set", f"data.path={src}")
    elif command == "validate":
        (work / "data/prepared").mkdir(parents=True)
        shutil.copy(src, work / "data/prepared/dataset.h5")
        proc = cli("validate", "-q", "--workdir", str(work))
    else:
        proc = cli("predict", "-q", "--workdir", str(work), "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(tmp_path / "cat"))
    line = user_error(proc, str(src.name if command != "validate" else "dataset.h5"), "written")
    assert ("'ans'" if kind == "labels-never-written" else "'images'") in line
    leftovers = [p for p in [*work.rglob("*"), *tmp_path.glob("cat/**/*")] if p.is_file()]
    assert leftovers == ([work / "data/prepared/dataset.h5"] if command == "validate" else [])


def test_intact_chunked_and_compressed_h5_still_prepare(tmp_path: Path) -> None:
    """The check must not refuse a good file: gzip-chunked images are smaller than their declared size."""
    src = tmp_path / "g.h5"
    make_galaxy10_h5(src, n=30, compression="gzip")
    proc = cli("prepare", "-q", "--workdir", str(tmp_path / "w"), "--set", "data.source=h5", "--set", f"data.path={src}")
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ item 3: temporaries of killed runs


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_prepare_killed_mid_write_leaves_no_temporary_after_the_next_run(tmp_path: Path) -> None:
    work = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-m", "pipeline.cli", "prepare", "-q", "--workdir", str(work), "--set", "data.synthetic.num_images=3000"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    pattern, deadline = str(work / "data/prepared/.dataset.h5.*.tmp"), time.monotonic() + 60
    while time.monotonic() < deadline and not any(os.path.getsize(p) > 1 << 20 for p in glob.glob(pattern)):
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert glob.glob(pattern), "the killed prepare left nothing to clean: the test did not kill it mid-write"
    done = cli("prepare", "-q", "--workdir", str(work), *SMALL)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (work / "data/prepared").iterdir()) == [".astroflow-stage.json", "dataset.h5"]


def test_shard_removes_dead_writers_temporaries_and_keeps_live_ones(workspace: Path, tmp_path: Path) -> None:
    work = copy_workspace(workspace, tmp_path)
    dead, live = dead_pid(), os.getpid()
    planted = {
        "dead-dir": work / f"data/.shards.{dead}-abcdefgh.tmp",
        "live-dir": work / f"data/.shards.{live}-abcdefgh.tmp",
        "dead-file": work / f"data/shards/.manifest.json.{dead}-ijklmnop.json.tmp",
        "live-file": work / f"data/.notes.json.{live}-ijklmnop.json.tmp",
        "dead-old": work / f"data/.validation.old-{dead}",
    }
    for name, path in planted.items():
        if name.endswith("file"):
            path.write_bytes(b"partial")
        else:
            path.mkdir()
            (path / "x.tar").write_bytes(b"partial")
    proc = cli("shard", "-q", "--workdir", str(work), *SMALL, "--set", "split.seed=7")  # a new key: shard really runs
    assert proc.returncode == 0, proc.stderr
    assert "built" in proc.stderr
    assert {name for name, path in planted.items() if path.exists()} == {"live-dir", "live-file"}


def test_a_dead_writers_replaced_directory_is_put_back_when_its_target_is_missing(tmp_path: Path) -> None:
    """Killed between atomic_dir's two renames: ``.x.old-PID`` holds the only copy of the previous result."""
    from pipeline.io import atomic_dir

    old = tmp_path / f".result.old-{dead_pid()}"
    old.mkdir()
    (old / "kept.txt").write_text("previous")
    with atomic_dir(tmp_path / "other") as tmp:
        (tmp / "a").write_text("new")
    assert (tmp_path / "result/kept.txt").read_text() == "previous" and not old.exists()


# ------------------------------------------------------------------ item 8: unwritable outputs


@pytest.mark.parametrize("stage", ["prepare", "validate", "shard", "train", "predict"])
def test_unwritable_output_is_one_line_and_exit_2(stage: str, workspace: Path, tmp_path: Path, checkpoint: Path) -> None:
    """A file where the output directory belongs (what stops root too; a read-only mount acts the same)."""
    work = copy_workspace(workspace, tmp_path)
    blocked = {"prepare": "data/prepared", "validate": "data/validation", "shard": "data/shards", "train": "data/train"}
    extra = ["--set", "train.epochs=1", "--set", f"model.img_size={MODEL_SIZE}", "--set", "train.device=cpu"]
    if stage == "predict":
        target = tmp_path / "catalog"
        target.write_text("not a directory")
        args = ["predict", "--checkpoint", str(checkpoint), "--input", str(work / "data/prepared/dataset.h5"), "--output", str(target)]
    else:
        target = work / blocked[stage]
        shutil.rmtree(target, ignore_errors=True)
        target.write_text("not a directory")
        args = [stage, *SMALL, *extra]
    t0 = time.monotonic()
    line = user_error(cli(*args, "-q", "--workdir", str(work)), str(target))
    assert "writable" in line
    assert stage != "train" or time.monotonic() - t0 < 30  # before training, not after an epoch


def test_run_refuses_an_unwritable_stage_directory_before_any_stage(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train").write_text("not a directory")
    user_error(cli("run", "-q", "--workdir", str(tmp_path), *SMALL), str(tmp_path / "data/train"))
    assert not (tmp_path / "data/prepared").exists()


def test_an_output_write_failing_mid_run_is_exit_2_naming_the_path(workspace: Path, tmp_path: Path) -> None:
    """A directory where prepare's dataset.h5 goes: the final rename fails after the work (EISDIR), no traceback."""
    work = copy_workspace(workspace, tmp_path)
    target = work / "data/prepared/dataset.h5"
    target.unlink()
    target.mkdir()
    (target / "keep").write_text("x")
    user_error(cli("prepare", "-q", "--workdir", str(work), *SMALL, "--set", "data.synthetic.seed=3"), str(target))
    assert [p.name for p in (work / "data/prepared").iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------ item 9: YAML limits and booleans


def alias_bomb(levels: int = 9) -> list[str]:
    """``a8`` expands to 10**9 values in a few hundred bytes."""
    return ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]", *(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels))]


YAML_CASES = {
    "bomb-in-a-typed-field": ("\n".join(alias_bomb()) + "\nmodel: {name: *a8}\n", [], "alias"),
    "bomb-with-set": ("\n".join(alias_bomb()) + "\n", ["--set", "train.epochs=2"], "alias"),
    "self-reference": ("data:\n  class_names: &c [a, *c]\n", [], "self-reference"),
    "deep-nesting": ("train:\n  lr: " + "[" * 5000 + "]" * 5000 + "\n", [], "nested deeper"),
    "huge-file": ("# " + "x" * (2 << 20) + "\ntrain: {epochs: 1}\n", [], "bytes"),
    "epochs-true": ("train: {epochs: true}\n", [], "train.epochs"),
    "bool-in-a-number-list": ("validate: {image_shape: [64, 64, true]}\n", [], "validate.image_shape"),
    "binary-file": (None, [], "UTF-8"),
}


@pytest.mark.parametrize("case", YAML_CASES)
def test_params_yaml_limits_and_no_booleans_for_numbers(case: str, tmp_path: Path) -> None:
    text, extra, expect = YAML_CASES[case]
    params = tmp_path / "params.yaml"
    if text is None:
        params.write_bytes(b"\xff\xfe\x00 train: {epochs: 1}")
    else:
        params.write_text(text)
    proc = cli("params", "--params", str(params), *extra, timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expect in proc.stderr and len(proc.stderr) < 500, proc.stderr[-2000:]


def list_bomb(levels: int = 9) -> str:
    """The same bomb as one flow sequence: its items are lists where strings belong, and their error repr expands."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]", *(f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels))]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("value", ["train.epochs=true", "train.weight_decay=false", f"data.class_names={list_bomb()}"])
def test_set_values_have_the_same_limits(value: str) -> None:
    proc = cli("params", "--set", value, timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr) < 500, proc.stderr[-2000:]


# ------------------------------------------------------------------ item 10 (part)


class Unsafe:
    """A class outside torch's allow-list."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo unsafe",))


def test_checkpoint_refusal_names_what_was_refused_without_unsafe_advice(tmp_path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save({"format": "astroflow-checkpoint-v1", "model": {}, "evil": Unsafe()}, buf)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(buf.getvalue())
    src = tmp_path / "in.h5"
    make_galaxy10_h5(src, n=10, size=MODEL_SIZE)
    line = user_error(cli("predict", "-q", "--checkpoint", str(evil), "--input", str(src), "--output", str(tmp_path / "cat")), str(evil))
    assert "system" in line and "GLOBAL" in line, line  # the part past 200 characters
    assert "weights_only" not in line


def test_serve_starts_its_temporary_server_without_analytics(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    from flows import serve as serve_mod
    from pipeline.config import Config
    from pipeline.layout import Layout

    seen: list[bool] = []
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setattr(serve_mod, "build_deployments", lambda *a: [])
    monkeypatch.setattr(prefect, "serve", lambda *d: seen.append(PREFECT_SERVER_ANALYTICS_ENABLED.value()))
    with temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: True}, restore_defaults={PREFECT_API_URL}):
        serve_mod.serve(Config(), Layout(Path(".")), None)
        assert seen == [False]
        monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")  # asked for explicitly: left alone
        serve_mod.serve(Config(), Layout(Path(".")), None)
        assert seen == [False, True]


def test_docs_warn_that_the_prefect_server_has_no_authentication_where_they_suggest_0_0_0_0() -> None:
    text = (REPO_ROOT / "docs/orchestration.md").read_text()
    at = text.index("--host 0.0.0.0")
    nearby = " ".join(text[at - 300 : at + 800].split()).lower()
    assert "no authentication" in nearby and "prefect_server_api_auth_string" in nearby


def test_relative_predict_paths_resolve_against_the_current_directory(tmp_path: Path, checkpoint: Path) -> None:
    here, work = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    make_galaxy10_h5(here / "in.h5", n=12, size=MODEL_SIZE)
    shutil.copy(checkpoint, here / "model.pt")
    args = ["predict", "-q", "--workdir", str(work), "--input", "in.h5", "--checkpoint", "model.pt", "--output", "cat"]
    proc = cli(*args, "--set", "predict.device=cpu", "--set", "predict.workers=0", cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (here / "cat").is_dir() and not (work / "cat").exists()

"""The stage graph and what is derived from it: import closures, store keys, records, dvc.yaml, the launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.layout import STAGE_DIRS, Layout
from pipeline.orchestrate import dvcfile, store
from pipeline.orchestrate.graph import GRAPH, STAGES, downstream, stored_stages
from pipeline.orchestrate.imports import closure, closure_files
from pipeline.orchestrate.launch import TrainingFailed, stream_command, torchrun_command
from conftest import make_galaxy10_h5

ROOT = Path(__file__).resolve().parents[1]
STORED = [s.name for s in stored_stages()]


# ------------------------------------------------------------------ the graph and its code


def test_every_stage_has_a_directory_a_function_and_known_upstream() -> None:
    assert set(GRAPH) == set(STAGE_DIRS)
    for i, stage in enumerate(STAGES):
        assert callable(stage.function), stage.name
        assert all(up in [s.name for s in STAGES[:i]] for up in stage.upstream), f"{stage.name} reads a later stage"
    assert downstream("shard") == ["shard", "train", "calibrate", "evaluate", "predict"]


def test_train_closure_holds_every_module_it_imports_and_nothing_outside() -> None:
    files = closure_files("pipeline.learn.train")
    for needed in ("pipeline/data/transforms.py", "pipeline/data/shards.py", "pipeline/learn/checkpoint.py", "pipeline/config.py",
                   "models/factory.py", "models/astroformer.py", "pipeline/learn/train.py", "pipeline/__init__.py"):
        assert needed in files, needed
    assert "pipeline/cli.py" not in files and not [f for f in files if f.startswith("flows/")]
    # calibrate imports evaluate inside a function: it counts
    assert "pipeline.score.evaluate" in closure("pipeline.score.calibrate")


def test_an_import_inside_a_function_joins_the_closure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.orchestrate import imports

    pkg = tmp_path / "pipeline"
    shutil.copytree(ROOT / "pipeline", pkg)
    shutil.copytree(ROOT / "models", tmp_path / "models")
    monkeypatch.setattr(imports, "ROOT", tmp_path)
    imports.closure.cache_clear()
    try:
        before = imports.closure_files("pipeline.data.prepare")
        digest = imports.code_digest("pipeline.data.prepare")
        assert "pipeline/score/metrics.py" not in before
        with open(pkg / "data" / "prepare.py", "a") as fh:
            fh.write("\n\ndef _late() -> None:\n    from pipeline.score import metrics  # noqa: F401\n")
        imports.closure.cache_clear()
        assert "pipeline/score/metrics.py" in imports.closure_files("pipeline.data.prepare")
        assert imports.code_digest("pipeline.data.prepare") != digest
    finally:
        imports.closure.cache_clear()


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("train.lr=0.1", {"train", "calibrate", "evaluate"}),
        ("model.drop_path_rate=0.3", {"train", "calibrate", "evaluate"}),
        ("split.seed=7", {"shard", "train", "calibrate", "evaluate"}),
        ("shard.image_format=npy", {"shard", "train", "calibrate", "evaluate"}),
        ("validate.min_class_count=2", {"validate", "shard", "train", "calibrate", "evaluate"}),
        ("data.synthetic.seed=5", set(STORED)),
        ("calibrate.max_iter=50", {"calibrate", "evaluate"}),
        ("calibrate.bins=10", {"calibrate", "evaluate"}),
        ("evaluate.tta=true", {"calibrate", "evaluate"}),
        ("evaluate.workers=3", {"evaluate"}),
        ("predict.batch_size=7", set()),
        ("registry.metric=top1", set()),
    ],
)
def test_stage_keys_follow_the_keys_each_stage_reads(tmp_path: Path, override: str, changed: set[str]) -> None:
    layout = Layout(tmp_path)
    before = store.plan_keys(load_config(None), layout)
    after = store.plan_keys(load_config(None, [override]), layout)
    assert {s for s in STORED if before[s] != after[s]} == changed
    assert store.plan_keys(load_config(None), layout) == before  # deterministic


def test_editing_a_stage_module_changes_its_key_and_downstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.orchestrate import imports

    layout, cfg = Layout(tmp_path), load_config(None)
    before = store.plan_keys(cfg, layout)
    real = imports.code_digest

    def edited(module: str) -> str:
        return real(module) + ("-edited" if "pipeline.score.calibrate" in closure(module) else "")

    monkeypatch.setattr(store, "code_digest", edited)
    after = store.plan_keys(cfg, layout)
    assert {s for s in STORED if before[s] != after[s]} == {"calibrate"} | ({"evaluate"} & {s for s in STORED})


def test_file_source_identity_is_part_of_the_prepare_key(tmp_path: Path) -> None:
    src = tmp_path / "g10.h5"
    make_galaxy10_h5(src, n=20)
    cfg = load_config(None, ["data.source=h5", f"data.path={src}"])
    before = store.plan_keys(cfg, Layout(tmp_path))
    make_galaxy10_h5(src, n=21)
    after = store.plan_keys(cfg, Layout(tmp_path))
    assert all(before[s] != after[s] for s in STORED)
    with pytest.raises(ValueError, match="needs the keys"):
        store.stage_key("train", cfg, {})


# ------------------------------------------------------------------ the store and workspace records


def test_build_commits_only_complete_directories(tmp_path: Path) -> None:
    where = store.StageDir(tmp_path, "train", "k1")
    calls = []

    def broken(out: Path) -> dict[str, Any]:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-stage")

    def good(out: Path) -> dict[str, Any]:
        calls.append(out)
        (out / "model.bin").write_bytes(b"weights")
        return {"loss": 0.5}

    with pytest.raises(RuntimeError, match="killed"):
        store.build(where, broken)
    assert not where.path.exists() and where.complete() is None
    assert not [p for p in where.path.parent.iterdir() if p.name.endswith(".tmp")]

    record, how = store.build(where, good)
    assert how == "built" and record["summary"] == {"loss": 0.5} and record["files"]["model.bin"][0] == 7
    assert (where.path / "model.bin").read_bytes() == b"weights" and (where.path / store.MARKER).is_file()
    again, how = store.build(where, good)
    assert how == "hit" and again["token"] == record["token"] and len(calls) == 1
    assert where.prefect_key() == f"astroflow-train-k1-{record['token']}"


def _workspace_dir(tmp_path: Path, key: str) -> Path:
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "a.bin").write_bytes(b"a" * 5000)
    (ws / "sub" / "b.txt").write_text("b")
    store.write_workspace_record(ws, "shard", key, {"n": 2}, 1.0)
    return ws


def test_adopting_a_workspace_directory_links_and_copies_nothing(tmp_path: Path) -> None:
    ws = _workspace_dir(tmp_path, "k7")
    where = store.StageDir(tmp_path / "store", "shard", "k7")
    record, how = store.build(where, lambda out: pytest.fail("must not rebuild"), adopt_from=ws)
    assert how == "adopted" and record["summary"] == {"n": 2}
    for rel in ("a.bin", "sub/b.txt"):
        assert os.stat(where.path / rel).st_ino == os.stat(ws / rel).st_ino  # the same bytes on disk


def test_a_changed_or_other_key_workspace_directory_is_rebuilt(tmp_path: Path) -> None:
    ws = _workspace_dir(tmp_path, "k7")
    other = store.StageDir(tmp_path / "store", "shard", "k8")
    assert store.build(other, lambda out: {"built": True}, adopt_from=ws)[1] == "built"
    os.utime(ws / "a.bin", ns=(1, 1))  # a copy with the same bytes (DVC re-copies file outputs) still counts
    assert store.workspace_record(ws) is not None
    (ws / "a.bin").write_bytes(b"b" * 5000)  # an edit by hand: the record no longer describes the files
    assert store.workspace_record(ws) is None
    where = store.StageDir(tmp_path / "store", "shard", "k7")
    assert store.build(where, lambda out: {"built": True}, adopt_from=ws)[1] == "built"


def test_check_out_links_a_stored_directory_into_the_workspace(tmp_path: Path) -> None:
    where = store.StageDir(tmp_path / "store", "calibrate", "k1")
    store.build(where, lambda out: (out / "calibration.json").write_text("{}") and {"temperature": 1.2})
    ws = tmp_path / "data" / "calibration"
    ws.mkdir(parents=True)
    (ws / "stale.json").write_text("old")
    record = store.check_out(where, ws)
    assert sorted(p.name for p in ws.iterdir()) == [store.WORKSPACE_MARKER, "calibration.json"]
    assert os.stat(ws / "calibration.json").st_ino == os.stat(where.path / "calibration.json").st_ino
    assert store.workspace_record(ws)["key"] == "k1" and record["summary"] == {"temperature": 1.2}


# ------------------------------------------------------------------ dvc.yaml


def test_committed_dvc_yaml_is_what_the_graph_generates() -> None:
    assert dvcfile.check(ROOT / "dvc.yaml") == [], "run `astroflow dvc-yaml` and commit dvc.yaml"
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(doc["stages"]) == [s.name for s in STAGES]
    assert set(closure_files("pipeline.learn.train")) <= set(doc["stages"]["train"]["deps"])
    assert "data/train/best.pt" in doc["stages"]["calibrate"]["deps"]
    assert "pipeline/score/evaluate.py" in doc["stages"]["calibrate"]["deps"]


def _copy_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_dvc_yaml_check_fails_after_a_stage_gains_an_import(tmp_path: Path) -> None:
    repo = _copy_project(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "dvc-yaml", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)

    ok = cli("--check")
    assert ok.returncode == 0, ok.stderr
    with open(repo / "pipeline" / "data" / "validate.py", "a") as fh:
        fh.write("\n\ndef _extra() -> None:\n    from pipeline.score import metrics  # noqa: F401\n")
    stale = cli("--check")
    assert stale.returncode == 1 and "validate" in stale.stderr and "astroflow dvc-yaml" in stale.stderr
    assert cli().returncode == 0
    deps = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["validate"]["deps"]
    assert "pipeline/score/metrics.py" in deps
    assert cli("--check").returncode == 0


# ------------------------------------------------------------------ the launcher


def test_torchrun_command_and_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, ["train.nproc_per_node=4"])
    cmd = torchrun_command(cfg, tmp_path / "p.yaml", tmp_path / "shards", tmp_path / "out", run_id="abc", resume=True)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd and cmd[-1] == "--resume"
    module = cmd.index("-m", 3) + 1
    assert cmd[module : module + 2] == ["pipeline.cli", "train"] and "--out" in cmd  # the one CLI, training in-process
    multi = load_config(None, ["train.nnodes=2"])
    monkeypatch.delenv("ASTROFLOW_RDZV_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match="ASTROFLOW_RDZV_ENDPOINT"):
        torchrun_command(multi, tmp_path / "p.yaml", tmp_path, tmp_path, run_id="abc")
    monkeypatch.setenv("ASTROFLOW_RDZV_ENDPOINT", "node0:29400")
    cmd = torchrun_command(multi, tmp_path / "p.yaml", tmp_path, tmp_path, run_id="abc")
    assert "--rdzv-endpoint=node0:29400" in cmd and "--nnodes=2" in cmd and "--standalone" not in cmd

    lines: list[str] = []
    script = "import sys\nfor i in range(100): print(f'step {i}')\nsys.exit(3)"
    with pytest.raises(TrainingFailed, match="status 3") as err:
        stream_command([sys.executable, "-c", script], lines.append)
    assert "step 99" in str(err.value) and "step 10\n" not in str(err.value)  # the tail, not the whole log
    assert "step 0" in lines[1] and "step 99" in lines[-1]  # every line reached the logger, in order


def test_print_command_shows_the_torchrun_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["train", "--print-command", "--workdir", str(tmp_path), "--set", "train.nproc_per_node=2"]) == 0
    line = capsys.readouterr().out.strip()
    assert "torch.distributed.run" in line and "--nproc-per-node=2" in line and str(tmp_path / "data" / "shards") in line


def test_the_documented_graph_is_the_declared_one() -> None:
    from pipeline.orchestrate.graph import mermaid

    doc = (ROOT / "docs" / "orchestration.md").read_text()
    block = doc.split("<!-- graph -->", 1)[1].split("<!-- /graph -->", 1)[0]
    assert block.strip() == f"```mermaid\n{mermaid()}\n```", "regenerate with `astroflow dvc-yaml --mermaid`"

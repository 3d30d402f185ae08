"""One pipeline end to end, as a user meets it: ``dvc repro``, the registry, the nightly catalog and the
retrain flow in one real git + DVC repository, sharing one store and one registry."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_galaxy10_h5
from conftest import ran_stages as _ran
from conftest import run_ok as _run

pytestmark = pytest.mark.slow

FLOW = """
import json, sys
from prefect.testing.utilities import prefect_test_harness
from flows.train_pipeline import train_pipeline
from pipeline.config import TrainConfig
sections = {"train": TrainConfig(**json.loads(sys.argv[1]))} if len(sys.argv) > 1 else {}
with prefect_test_harness(server_startup_timeout=180):
    print("RESULT " + json.dumps(train_pipeline(base_params="params.yaml", workdir=".", **sections)))
"""


def _flow(repo: Path, train: dict | None = None) -> dict:
    (repo / "retrain.py").write_text(FLOW)
    env = {**os.environ, "PYTHONPATH": str(repo), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = _run([sys.executable, "retrain.py", *([json.dumps(train)] if train else [])], repo, env=env)
    return json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))


def _blocks_not_in(root: Path, known: set[tuple[int, int]]) -> int:
    """Bytes allocated under ``root`` by files whose inode is not in ``known`` (links are free, copies are not)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_file() and (st.st_dev, st.st_ino) not in known | seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _inodes(root: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_dev, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def _status(repo: Path) -> str:
    return _run(["dvc", "status"], repo)


def test_dvc_registry_nightly_and_retrain_share_one_pipeline(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["schedule"] = {"inbox_settle_s": 0}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], project))[-1] == "predict"
    assert "up to date" in _status(project)

    # A model dvc repro trained goes into the registry and production.
    _run(["astroflow", "registry", "register"], project)
    _run(["astroflow", "registry", "promote", "--force", "--reason", "a 2-epoch toy model for this test"], project)
    shown = _run(["astroflow", "registry", "show"], project)
    assert "dvc workspace" in shown and "a 2-epoch toy model" in shown

    # The nightly catalog uses that model and writes its own root: dvc status stays clean.
    (project / "inbox").mkdir()
    make_galaxy10_h5(project / "inbox" / "night1.h5", n=12, size=48, seed=5)
    _run(["astroflow", "nightly", "-q"], project)
    assert any((project / "catalog").rglob("*.parquet"))
    assert "up to date" in _status(project)

    # The retrain flow with the same parameters recomputes nothing and copies no data.
    data_inodes = _inodes(project / "data")
    same = _flow(project)
    assert {s["how"] for s in same["stages"].values()} == {"adopted"}, same["stages"]
    for stage in ("prepare", "shard"):
        added = _blocks_not_in(project / "cache" / stage, data_inodes)
        assert added < 64 * 1024, f"{stage}: {added} bytes copied into the store"
    assert not same["promoted"]  # the same model is already production

    # A UI-style retrain with epochs changed reuses the data stages and lets the rule decide.
    changed = _flow(project, {"epochs": 1})
    hows = {s: v["how"] for s, v in changed["stages"].items()}
    assert hows == {"prepare": "hit", "validate": "hit", "shard": "hit", "train": "built", "calibrate": "built", "evaluate": "built"}
    assert not changed["promoted"]  # a 1-epoch model is below the default floor: production keeps the dvc model
    assert changed["production_id"] == same["production_id"]
    assert "up to date" in _status(project)


def test_editing_stage_code_shows_in_dvc_status(project: Path) -> None:
    _run(["dvc", "repro", "shard"], project)
    with open(project / "pipeline" / "data" / "shards.py", "a") as fh:
        fh.write("\n# an edit\n")
    status = _status(project)
    assert "shard:" in status and "pipeline/data/shards.py" in status and "prepare:" not in status

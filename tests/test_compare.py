"""``astroflow compare``: the config section, and a tiny comparison on the synthetic source in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, run_ok

from pipeline.config import ConfigError, load_config

TINY = {
    "data": {"synthetic": {"num_images": 160, "image_size": 32}},
    "model": {"name": "astroformer_pico", "img_size": 32},
    "train": {
        "epochs": 1, "batch_size": 16, "warmup_epochs": 0, "workers": 0, "shuffle_buffer": 50, "max_steps_per_epoch": 3,
        "deterministic": True, "mixup_alpha": 0.0, "randaugment": None,
    },
    "evaluate": {"workers": 0, "batch_size": 32},
    "compare": {
        "splits": 3,
        "bootstrap": 200,
        "baseline": "pico",
        "candidates": {"pico": {}, "pico_tta": {"set": {"evaluate.tta": True}}},
    },
}


def _compare(workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "compare", "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def _write(tmp_path: Path, params: dict) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def test_baseline_must_be_a_candidate(tmp_path: Path) -> None:
    _write(tmp_path, {"compare": {**TINY["compare"], "baseline": "resnet50"}})
    proc = _compare(tmp_path)
    assert proc.returncode == 2
    assert "compare: baseline 'resnet50' is not one of the candidates" in proc.stderr


def test_a_misspelt_candidate_override_is_an_error_before_any_run(tmp_path: Path) -> None:
    _write(tmp_path, {"compare": {"candidates": {"a": {}, "b": {"set": {"model.nmae": "resnet18"}}}}})
    proc = _compare(tmp_path)
    assert proc.returncode == 2
    assert "compare.candidates.b" in proc.stderr and "model.nmae: unknown key" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_candidate_keys_are_checked_by_the_config() -> None:
    with pytest.raises(ConfigError, match="compare.candidates.a.sett: unknown key"):
        load_config(None, ["compare.candidates={a: {sett: {}}}"])


def test_seconds_budget_sets_the_same_time_budget_for_every_candidate(tmp_path: Path) -> None:
    from pipeline.layout import Layout
    from pipeline.score.compare import budgeted, candidate_configs

    cfg = load_config(None, ["compare.budget=seconds", "compare.seconds=90", "train.epochs=7"])
    cfg.compare.candidates["slow"] = cfg.compare.candidates["resnet18"].model_copy(update={"set": {"model.name": "resnet18", "train.epochs": 99}})
    runs = [budgeted(c, cfg, 2) for c in candidate_configs(cfg, Layout(tmp_path), []).values()]
    assert {(r.train.time_budget_s, r.train.epochs, r.split.seed) for r in runs} == {(90.0, 7, cfg.split.seed + 2)}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, bytes]:
    """A finished tiny comparison (two settings of one model, evaluate.tta off and on, over 3 splits): the workdir,
    the command's output and its table.csv."""
    work = _write(tmp_path_factory.mktemp("compare"), TINY)
    out = run_ok([sys.executable, "-m", "pipeline.cli", "compare", "--workdir", str(work)], REPO_ROOT)
    return work, out, (work / "compare" / "table.csv").read_bytes()


@pytest.mark.slow
def test_tiny_compare_writes_the_tables(compared: tuple[Path, str, bytes]) -> None:
    """The one pipeline trains each split once for both settings; every file is written, with the command."""
    work, out, _ = compared
    results = work / "compare"
    assert {p.name for p in results.iterdir()} == {"runs.csv", "table.csv", "table.md", "paired.csv", "paired.md", "compare.json", "compare.png"}
    runs = _rows(results / "runs.csv")
    assert sorted((r["candidate"], r["split_seed"]) for r in runs) == sorted((c, str(s)) for c in ("pico", "pico_tta") for s in (42, 43, 44))
    assert len({r["key_prepare"] for r in runs}) == 1 and len({r["key_shard"] for r in runs}) == 3
    assert len({r["key_train"] for r in runs}) == 3 and len({r["key_evaluate"] for r in runs}) == 6  # TTA retrains nothing
    table = _rows(results / "table.csv")
    assert [r["candidate"] for r in table] == ["pico", "pico_tta"] and {r["splits"] for r in table} == {"3"}
    for row in table:
        for m in ("top1", "macro_f1", "balanced_accuracy"):
            assert float(row[f"{m}_low"]) <= float(row[f"{m}_mean"]) <= float(row[f"{m}_high"])
    paired = _rows(results / "paired.csv")
    assert {(r["candidate"], r["baseline"]) for r in paired} == {("pico_tta", "pico")}
    assert json.loads((results / "compare.json").read_text())["baseline"] == "pico"
    # the printed table records the command that made it (the file may since have been re-made by another test)
    assert f"Reproduce: `astroflow compare --workdir {work}`" in out
    assert "| pico | astroformer_pico |" in out


@pytest.mark.slow
def test_rerun_needs_force_and_fixed_seeds_reproduce_the_table(compared: tuple[Path, str, bytes]) -> None:
    """Retrained from scratch (a fresh store) at an epoch budget: the same metrics; only measured seconds differ."""
    work, _, first = compared
    refused = _compare(work)
    assert refused.returncode == 2 and "--force" in refused.stderr
    again = run_ok([sys.executable, "-m", "pipeline.cli", "compare", "--workdir", str(work), "--force", "--set", "schedule.cache_root=fresh"], REPO_ROOT)
    assert again.count("cache miss train") == 3
    metrics = [c for c in _rows(work / "compare" / "table.csv")[0] if not c.startswith("train_seconds")]
    before = [{c: r[c] for c in metrics} for r in csv.DictReader(first.decode().splitlines())]
    assert [{c: r[c] for c in metrics} for r in _rows(work / "compare" / "table.csv")] == before


@pytest.mark.slow
def test_flow_reuses_every_run_and_publishes_the_same_table(compared: tuple[Path, str, bytes]) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.compare import compare_flow

    work, _, first = compared
    with prefect_test_harness(server_startup_timeout=180):
        result = compare_flow(base_params="params.yaml", workdir=str(work), force=True)
    assert result["artifacts"] == ["compare-table", "compare-report"]
    assert (work / "compare" / "table.csv").read_bytes() == first  # the same training seconds: nothing retrained

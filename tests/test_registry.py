"""The model registry: the promotion rule, re-scoring across data sets, lineage, rollback and the CLI.

Models are tiny GAP-linear checkpoints set by hand (no training) and evaluated for real on tiny shards.
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import EVAL_OVERRIDES, evaluated_workspace, GAP_MODEL, SHARD_SIZE, eval_cfg, make_checkpoint, nearest_red_mean, register_gap_model, write_red_shards
from sklearn import metrics as skm

from pipeline.score import promotion
from pipeline.score import registry as reg
from pipeline.learn.checkpoint import model_id
from pipeline.cli import main
from pipeline.score.evaluate import evaluate
from pipeline.io import read_json
from pipeline.data.shards import SPLIT_TABLE, load_manifest

register_gap_model()
pytestmark = pytest.mark.usefixtures("one_thread")

RULE = promotion.Rule(metric="macro_f1", min_value=0.5, min_margin_over_majority=0.2)
OTHER_CLASSES = [f"type{i}" for i in range(10)]


def _good(model: torch.nn.Module) -> None:
    nearest_red_mean(model, 1.0)


def _blind_to_class_0(model: torch.nn.Module) -> None:
    """The good model that never predicts class 0: a little worse on the 100-image set."""
    nearest_red_mean(model, 1.0)
    with torch.no_grad():
        model.fc.bias[0] -= 1e4


@pytest.fixture(scope="module")
def data_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other images under the same galaxy ids, split with another seed: many of its test ids trained production."""
    return write_red_shards(tmp_path_factory.mktemp("data-b"), "split.seed=1", n=150, seed=1)


@pytest.fixture(scope="module")
def data_other_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_red_shards(tmp_path_factory.mktemp("data-c"), f"data.class_names=[{','.join(OTHER_CLASSES)}]")


def _evaluated(
    tmp_path: Path, shards: Path, name: str, init: Callable[[torch.nn.Module], None] | None, *overrides: str
) -> tuple[Path, Path]:
    """(checkpoint, eval dir) of a hand-set model evaluated on ``shards`` as the evaluate stage does."""
    ckpt = make_checkpoint(tmp_path / f"{name}.pt", GAP_MODEL, img_size=SHARD_SIZE, init=init, overrides=overrides)
    evaluate(eval_cfg(*overrides), shards, ckpt, tmp_path / f"{name}-eval", progress=False)
    return ckpt, tmp_path / f"{name}-eval"


def _register(root: Path, tmp_path: Path, shards: Path, name: str, init: Any, *overrides: str, **kw: Any) -> str:
    ckpt, eval_dir = _evaluated(tmp_path, shards, name, init, *overrides)
    return reg.register_model(
        root, eval_cfg(*overrides), checkpoint=ckpt, calibration=None, eval_dir=eval_dir, shards_dir=shards, source="test", **kw
    )


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    ("counts", "metric"),
    [([5, 3, 2], "top1"), ([5, 3, 2], "macro_f1"), ([5, 3, 2], "balanced_accuracy"), ([4, 0, 6, 1], "macro_f1")],
)
def test_majority_baseline_is_what_the_constant_classifier_scores(counts: list[int], metric: str) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    always = np.full_like(y, int(np.argmax(counts)))
    expected = {
        "top1": skm.accuracy_score(y, always),
        "macro_f1": skm.f1_score(y, always, average="macro"),
        "balanced_accuracy": skm.balanced_accuracy_score(y, always),
    }[metric]
    assert promotion.majority_baseline(counts, metric) == pytest.approx(expected)


def test_majority_baseline_of_macro_f1_follows_the_formula() -> None:
    p, k = 0.4, 4
    assert promotion.majority_baseline([4, 2, 2, 2], "macro_f1") == pytest.approx(2 * p / (1 + p) / k)


@pytest.mark.parametrize(
    ("cand", "prod_id", "prod", "majority", "same_classes", "promote", "why"),
    [
        (0.60, None, None, 0.05, True, True, "no production"),
        (0.49, None, None, 0.05, True, False, "floor"),
        (0.50, None, None, 0.05, True, True, "no production"),
        (0.60, None, None, 0.45, True, False, "majority"),
        (0.65, None, None, 0.45, True, True, "no production"),
        (float("nan"), None, None, 0.05, True, False, "no finite"),
        (None, "old", 0.5, 0.05, True, False, "no finite"),
        (0.70, "old", 0.60, 0.05, True, True, "beats"),
        (0.60, "old", 0.60, 0.05, True, False, "does not beat"),
        (0.55, "old", 0.60, 0.05, True, False, "does not beat"),
        (0.90, "old", 0.60, 0.05, False, False, "--force"),
        (0.90, "old", float("nan"), 0.05, True, False, "--force"),
        (0.90, "new", 0.90, 0.05, True, False, "already"),
    ],
)
def test_decide(
    cand: float | None, prod_id: str | None, prod: float | None, majority: float, same_classes: bool, promote: bool, why: str
) -> None:
    d = promotion.decide("new", cand, rule=RULE, majority_value=majority, production_id=prod_id, production_value=prod, same_classes=same_classes)
    assert d.promote is promote
    assert why in d.reason
    assert d.metric == "macro_f1" and d.candidate_id == "new" and d.production_id == prod_id and not d.forced


# ------------------------------------------------------------------ registration and promotion


def test_junk_model_is_refused_into_an_empty_registry(red_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    mid = _register(root, tmp_path, red_shards, "junk", None)
    refused = reg.promote(root, mid, eval_cfg())
    assert not refused.promote and "floor" in refused.reason and reg.production_id(root) is None
    # Even with no floor, the margin over always answering the majority class keeps it out.
    no_floor = reg.promote(root, mid, eval_cfg("registry.min_value=0"))
    assert not no_floor.promote and "majority" in no_floor.reason and reg.production_id(root) is None
    counts = list(load_manifest(red_shards)["splits"]["test"]["class_counts"].values())
    assert no_floor.majority_value == pytest.approx(promotion.majority_baseline(counts, "macro_f1"))
    assert [h["promote"] for h in reg.history(root)] == [False, False]


def test_good_model_is_promoted_with_its_lineage(red_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    mid = _register(root, tmp_path, red_shards, "good", _good, stage_keys={"train": "k1"}, flow_run_id="run-1")
    ckpt = tmp_path / "good.pt"
    assert mid == model_id(ckpt)
    assert _register(root, tmp_path, red_shards, "good", _good) == mid, "registering again is a no-op"
    assert len(reg.list_models(root)) == 1

    decision = reg.promote(root, mid, eval_cfg(), by="test")
    assert decision.promote and "no production" in decision.reason
    prod = reg.production_dir(root)
    assert reg.production_checkpoint(root) == prod / reg.MODEL_FILE and prod.name == mid
    assert (prod / reg.MODEL_FILE).read_bytes() == ckpt.read_bytes()
    assert (prod / reg.SPLIT_FILE).read_bytes() == (red_shards / SPLIT_TABLE).read_bytes()
    metrics, lineage = reg.read_record(prod)
    assert metrics == read_json(tmp_path / "good-eval" / "metrics.json")
    assert lineage["model_id"] == mid and lineage["source"] == "test" and lineage["registered_at"]
    assert lineage["config"] == eval_cfg().to_dict() and lineage["config_hash"] == eval_cfg().hash()
    assert lineage["data_hash"] == load_manifest(red_shards)["data_hash"]
    assert lineage["code"]["git_commit"] is None or len(lineage["code"]["git_commit"]) == 40
    assert "torch" in lineage["code"] and "git_dirty" in lineage["code"]
    assert lineage["metrics"]["macro_f1"] == metrics["macro_f1"] == decision.candidate_value
    assert lineage["stage_keys"] == {"train": "k1"} and lineage["flow_run_id"] == "run-1"
    (entry,) = reg.history(root)
    assert entry["by"] == "test" and entry["action"] == "promote" and entry["promote"] and entry["at"]
    assert not reg.promote(root, mid, eval_cfg()).promote, "already production"


def test_same_split_needs_a_strictly_better_model(red_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    weaker = _register(root, tmp_path, red_shards, "weaker", _blind_to_class_0)
    assert reg.promote(root, weaker, eval_cfg()).promote
    good = _register(root, tmp_path, red_shards, "good", _good)
    better = reg.promote(root, good, eval_cfg())
    assert better.promote and better.basis == promotion.STORED
    assert better.candidate_value > better.production_value
    assert reg.promote(root, weaker, eval_cfg()).promote is False

    # The same weights under another config: another model id, identical scores; a tie keeps production.
    twin = _register(root, tmp_path, red_shards, "twin", _good, "train.seed=7")
    assert twin != good
    tie = reg.promote(root, twin, eval_cfg())
    assert not tie.promote and tie.candidate_value == tie.production_value and reg.production_id(root) == good


def test_production_is_rescored_on_the_candidate_split_minus_its_training_ids(
    red_shards: Path, data_b: Path, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    cfg = eval_cfg("registry.min_value=0.3")
    prod = _register(root, tmp_path, red_shards, "prod", _blind_to_class_0)
    assert reg.promote(root, prod, cfg).promote
    cand = _register(root, tmp_path, data_b, "cand", _good)
    assert reg.read_record(reg.candidate_dir(root, cand))[1]["data_hash"] != reg.read_record(reg.production_dir(root))[1]["data_hash"]

    decision = reg.promote(root, cand, cfg)

    trained = set(pd.read_parquet(red_shards / SPLIT_TABLE).query("split == 'train'")["id"])
    test_b = set(pd.read_parquet(data_b / SPLIT_TABLE).query("split == 'test'")["id"])
    kept = test_b - trained
    assert 0 < len(kept) < len(test_b), "the fixture must overlap production's training split, and not wholly"
    assert decision.num_samples == len(kept) and "re-scored" in decision.basis

    def reference(checkpoint: Path, name: str) -> tuple[float, np.ndarray]:
        evaluate(cfg, data_b, checkpoint, tmp_path / name, progress=False)
        with open(tmp_path / name / "predictions.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["id"] in kept]
        y, yhat = np.array([int(r["label"]) for r in rows]), np.array([int(r["pred"]) for r in rows])
        return skm.f1_score(y, yhat, average="macro"), y

    prod_f1, y = reference(tmp_path / "prod.pt", "prod-on-b")
    cand_f1, _ = reference(tmp_path / "cand.pt", "cand-on-b")
    assert decision.production_value == pytest.approx(prod_f1)
    assert decision.candidate_value == pytest.approx(cand_f1)
    assert decision.majority_value == pytest.approx(promotion.majority_baseline(np.bincount(y, minlength=10), "macro_f1"))
    assert decision.promote is (cand_f1 > prod_f1)
    assert reg.production_id(root) == (cand if decision.promote else prod)


def test_rescoring_refuses_shards_that_are_not_the_candidates(red_shards: Path, data_b: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    prod = _register(root, tmp_path, red_shards, "prod", _blind_to_class_0)
    reg.promote(root, prod, eval_cfg())
    cand = _register(root, tmp_path, data_b, "cand", _good)
    with pytest.raises(reg.RegistryError, match="not the test split"):
        reg.promote(root, cand, eval_cfg(), shards_dir=red_shards)
    assert reg.production_id(root) == prod


def test_class_list_change_needs_force_and_a_reason(red_shards: Path, data_other_classes: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    prod = _register(root, tmp_path, red_shards, "prod", _good)
    reg.promote(root, prod, eval_cfg())
    renamed = f"data.class_names=[{','.join(OTHER_CLASSES)}]"
    cand = _register(root, tmp_path, data_other_classes, "cand", _good, renamed)

    refused = reg.promote(root, cand, eval_cfg(renamed))
    assert not refused.promote and "--force" in refused.reason and reg.production_id(root) == prod
    with pytest.raises(reg.RegistryError, match="--reason"):
        reg.promote(root, cand, eval_cfg(renamed), force=True)
    forced = reg.promote(root, cand, eval_cfg(renamed), force=True, reason="new morphology taxonomy")
    assert forced.promote and forced.forced and reg.production_id(root) == cand
    last = reg.history(root)[-1]
    assert last["forced"] and "new morphology taxonomy" in last["reason"] and last["by"] == "cli"
    assert last["production_id"] == prod and last["candidate_id"] == cand


def test_rollback_restores_the_previous_production_model(red_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    ids = [_register(root, tmp_path, red_shards, f"m{i}", _good, f"train.seed={i}") for i in range(3)]
    with pytest.raises(reg.RegistryError, match="no production"):
        reg.rollback(root)
    for mid in ids:
        reg.promote(root, mid, eval_cfg(), force=True, reason="test")
    assert reg.production_id(root) == ids[2]

    assert reg.rollback(root, reason="m2 misbehaves") == ids[1] and reg.production_id(root) == ids[1]
    last = reg.history(root)[-1]
    assert last["action"] == "rollback" and last["reason"] == "m2 misbehaves" and last["production_id"] == ids[2]
    assert reg.rollback(root) == ids[0] and reg.production_id(root) == ids[0]
    with pytest.raises(reg.RegistryError, match="nothing to roll back"):
        reg.rollback(root)

    reg.promote(root, ids[2], eval_cfg(), force=True, reason="fixed")
    assert reg.rollback(root) == ids[0]


def test_register_refuses_an_evaluation_of_another_model(red_shards: Path, tmp_path: Path) -> None:
    ckpt, _ = _evaluated(tmp_path, red_shards, "good", _good)
    _, other_eval = _evaluated(tmp_path, red_shards, "junk", None)
    with pytest.raises(reg.RegistryError, match="re-run evaluate"):
        reg.register_model(
            tmp_path / "registry", eval_cfg(), checkpoint=ckpt, calibration=None, eval_dir=other_eval,
            shards_dir=red_shards, source="test",
        )
    assert not (tmp_path / "registry" / reg.CANDIDATES).exists()


def test_unknown_model_and_plain_production_directory_are_errors(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    with pytest.raises(reg.RegistryError, match="no such registered model"):
        reg.promote(root, "ghost", eval_cfg())
    with pytest.raises(reg.RegistryError, match="no production model"):
        reg.production_checkpoint(root)
    (root / reg.PRODUCTION).mkdir(parents=True)
    with pytest.raises(reg.RegistryError, match="symlink"):
        reg.production_dir(root)


def test_concurrent_promotions_keep_the_best(red_shards: Path, tmp_path: Path) -> None:
    """Compare-and-switch runs under a lock: whatever the interleaving, the best candidate ends in production."""
    root = tmp_path / "registry"
    _, eval_dir = _evaluated(tmp_path, red_shards, "base", _good)
    scores = {}
    for i in range(6):
        ckpt = make_checkpoint(tmp_path / f"c{i}.pt", GAP_MODEL, img_size=SHARD_SIZE, overrides=[f"train.seed={i}"])
        mid = model_id(ckpt)
        scores[mid] = 0.55 + 0.05 * i
        metrics = {**read_json(eval_dir / "metrics.json"), "model_id": mid, "macro_f1": scores[mid]}
        (tmp_path / f"c{i}-eval").mkdir()
        (tmp_path / f"c{i}-eval" / "metrics.json").write_text(json.dumps(metrics))
        reg.register_model(
            root, eval_cfg(), checkpoint=ckpt, calibration=None, eval_dir=tmp_path / f"c{i}-eval",
            shards_dir=red_shards, source="test",
        )
    threads = [threading.Thread(target=reg.promote, args=(root, mid, eval_cfg())) for mid in scores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.production_id(root) == max(scores, key=scores.get)
    assert len(reg.history(root)) == len(scores)


# ------------------------------------------------------------------ CLI


@pytest.fixture
def workspace(red_shards: Path, tmp_path: Path) -> Path:
    """A workdir as `dvc repro` leaves it: shards, best.pt, calibration.json and the evaluation."""
    return evaluated_workspace(tmp_path / "wd", red_shards, _good)


def _cli(wd: Path, *args: str) -> int:
    return main(["registry", *args, "--workdir", str(wd), "-q", *(f"--set={o}" for o in EVAL_OVERRIDES)])


def test_cli_registers_and_promotes_the_workspace_model(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = workspace / "registry"
    assert _cli(workspace, "register") == 0
    (row,) = reg.list_models(root)
    mid = row["model_id"]
    assert mid == model_id(workspace / "data" / "train" / "best.pt") and row["source"] == "dvc workspace"
    assert (reg.candidate_dir(root, mid) / reg.CALIBRATION_FILE).read_bytes() == (
        workspace / "data" / "calibration" / "calibration.json"
    ).read_bytes()

    assert _cli(workspace, "promote", "--set=registry.min_value=1.0") == 1  # refused by the rule: a check said no
    assert reg.production_id(root) is None
    assert _cli(workspace, "promote") == 0
    assert reg.production_id(root) == mid
    assert reg.history(root)[-1]["by"] == "cli"

    capsys.readouterr()
    assert _cli(workspace, "list") == 0
    out = capsys.readouterr().out
    assert mid in out and "*" in out and "macro_f1" in out
    assert _cli(workspace, "show") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model_id"] == mid and shown["production"] and shown["lineage"]["source"] == "dvc workspace"


def test_cli_errors_exit_2_with_one_line(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(workspace, "promote") == 2, "nothing registered yet"
    assert _cli(workspace, "register") == 0
    capsys.readouterr()
    assert _cli(workspace, "promote", "no-such-model") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
    assert _cli(workspace, "promote", "--force") == 2
    assert _cli(workspace, "show", "no-such-model") == 2
    assert _cli(workspace, "rollback") == 2
    assert _cli(workspace, "promote") == 0
    assert _cli(workspace, "rollback", "--reason", "only one model") == 2
    # A workspace whose model was retrained but not evaluated is refused, not registered with stale metrics.
    make_checkpoint(workspace / "data" / "train" / "best.pt", GAP_MODEL, img_size=SHARD_SIZE)
    assert _cli(workspace, "register") == 2
    assert len(reg.list_models(workspace / "registry")) == 1

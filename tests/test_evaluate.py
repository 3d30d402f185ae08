"""The evaluate and calibrate stages end to end on tiny shards with tiny real checkpoints."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GAP_MODEL, SHARD_SIZE, eval_cfg, make_checkpoint, nearest_red_mean, register_gap_model
from PIL import Image
from sklearn import metrics as skm

from pipeline.score import metrics as M
from pipeline.score.calibrate import calibrate
from pipeline.learn.checkpoint import save_checkpoint
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.score.evaluate import evaluate
from pipeline.score.trained_model import TrainedModel
from pipeline.data.reader import iter_split
from pipeline.data.shards import load_manifest
from pipeline.data.transforms import eval_transform

register_gap_model()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet18.pt", "resnet18", img_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def gap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Colour-only, informative and 10x over-confident: a model temperature scaling must cool down."""
    path = tmp_path_factory.mktemp("ckpt") / "gap.pt"
    return make_checkpoint(path, GAP_MODEL, img_size=SHARD_SIZE, init=lambda m: nearest_red_mean(m, 10.0))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_every_output(red_shards: Path, resnet: Path, tmp_path: Path) -> None:
    cfg = eval_cfg()
    out = tmp_path / "eval"
    copy = tmp_path / "metrics" / "eval.json"
    result = evaluate(cfg, red_shards, resnet, out, metrics_path=copy, progress=False)

    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(copy.read_text()) == metrics
    for key in ("top1", "top5", "macro_f1", "balanced_accuracy", "num_samples", "per_class", "error_rate", "tta"):
        assert key in metrics
    assert metrics["tta"] is False and "temperature" not in metrics
    n_test = load_manifest(red_shards)["splits"]["test"]["num_samples"]
    names = cfg.data.class_names
    assert metrics["num_samples"] == n_test == result["num_samples"]
    assert set(metrics["per_class"]) == set(names)
    for pc in metrics["per_class"].values():
        assert set(pc) == {"precision", "recall", "f1", "support", "error_contribution"}
    assert sum(pc["error_contribution"] for pc in metrics["per_class"].values()) == pytest.approx(metrics["error_rate"])

    preds = _read_csv(out / "predictions.csv")
    assert list(preds[0]) == ["id", "row", "label", "pred", "max_prob"]
    expected = {r.row: (r.id, r.label) for r in iter_split(red_shards, "test")}
    assert {int(p["row"]): (p["id"], int(p["label"])) for p in preds} == expected
    y = np.array([int(p["label"]) for p in preds])
    yhat = np.array([int(p["pred"]) for p in preds])
    assert metrics["top1"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert metrics["macro_f1"] == pytest.approx(skm.f1_score(y, yhat, average="macro"))
    assert metrics["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, yhat))

    confusion = _read_csv(out / "confusion.csv")
    assert len(confusion) == n_test and list(confusion[0]) == ["actual", "predicted"]
    assert [(c["actual"], c["predicted"]) for c in confusion] == [(names[a], names[b]) for a, b in zip(y, yhat)]

    with Image.open(out / "confusion.png") as im:
        im.verify()
    with Image.open(out / "confusion.png") as im:
        assert im.format == "PNG" and min(im.size) > 400

    report = (out / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert "](confusion.png)" in report
    assert not list(out.parent.glob(".*tmp")), "temporary files left behind"

    first = {f: (out / f).read_bytes() for f in ("metrics.json", "predictions.csv", "confusion.csv", "report.md")}
    evaluate(cfg, red_shards, resnet, out, metrics_path=copy, progress=False)
    assert {f: (out / f).read_bytes() for f in first} == first, "a re-run must reproduce every output"


def test_tta_runs_and_changes_a_rotation_sensitive_model(red_shards: Path, resnet: Path, tmp_path: Path) -> None:
    plain = evaluate(eval_cfg(), red_shards, resnet, tmp_path / "plain", progress=False)
    tta = evaluate(eval_cfg("evaluate.tta=true"), red_shards, resnet, tmp_path / "tta", progress=False)
    assert tta["tta"] is True and json.loads((tmp_path / "tta" / "metrics.json").read_text())["tta"] is True
    p0 = np.array([float(r["max_prob"]) for r in _read_csv(tmp_path / "plain" / "predictions.csv")])
    p1 = np.array([float(r["max_prob"]) for r in _read_csv(tmp_path / "tta" / "predictions.csv")])
    assert not np.allclose(p0, p1, atol=1e-4)
    assert plain["num_samples"] == tta["num_samples"]


def test_tta_changes_nothing_for_a_rotation_invariant_model(red_shards: Path, gap: Path, tmp_path: Path) -> None:
    plain = evaluate(eval_cfg(), red_shards, gap, tmp_path / "plain", progress=False)
    tta = evaluate(eval_cfg("evaluate.tta=true"), red_shards, gap, tmp_path / "tta", progress=False)
    a = _read_csv(tmp_path / "plain" / "predictions.csv")
    b = _read_csv(tmp_path / "tta" / "predictions.csv")
    assert [r["pred"] for r in a] == [r["pred"] for r in b]
    np.testing.assert_allclose([float(r["max_prob"]) for r in a], [float(r["max_prob"]) for r in b], atol=2e-5)
    for key in ("top1", "macro_f1", "balanced_accuracy"):
        assert plain[key] == tta[key]
    assert plain["nll"] == pytest.approx(tta["nll"], rel=1e-4, abs=1e-5)


def test_preprocessing_comes_from_the_checkpoint(
    red_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoint trained at 16 px on [-1, 1] inputs; the evaluating config says 32 px and ImageNet statistics."""
    import pipeline.score.evaluate as ev

    ckpt = make_checkpoint(tmp_path / "gap16.pt", GAP_MODEL, img_size=16, input_range="minus_one_one")
    cfg = eval_cfg("model.img_size=32", "train.input_range=imagenet", "evaluate.workers=2")
    calls = []

    def spy(img_size: int, input_range: str) -> Callable[[np.ndarray], torch.Tensor]:
        calls.append((img_size, input_range))
        return eval_transform(img_size, input_range)

    monkeypatch.setattr(ev, "eval_transform", spy)
    evaluate(cfg, red_shards, ckpt, tmp_path / "eval", progress=False)
    assert calls == [(16, "minus_one_one")]

    from pipeline.learn.checkpoint import load_model

    model, _, _ = load_model(ckpt)
    transform = eval_transform(16, "minus_one_one")
    samples = list(iter_split(red_shards, "test"))
    x = torch.stack([transform(r.image) for r in samples])
    assert x.shape[-1] == 16
    with torch.inference_mode():
        probs = M.softmax(model(x))
    expected = {r.row: p.max() for r, p in zip(samples, probs)}
    got = {int(r["row"]): float(r["max_prob"]) for r in _read_csv(tmp_path / "eval" / "predictions.csv")}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[r] for r in sorted(got)], [expected[r] for r in sorted(got)], atol=2e-6)


def test_calibrate_then_evaluate_cools_an_overconfident_model(red_shards: Path, gap: Path, tmp_path: Path) -> None:
    cfg = eval_cfg()
    cal_path = tmp_path / "calibration.json"
    cal = calibrate(cfg, red_shards, gap, cal_path, progress=False)
    stored = json.loads(cal_path.read_text())
    assert stored == json.loads(json.dumps(cal))
    assert stored["split"] == "val" and stored["enabled"] is True
    assert stored["num_samples"] == load_manifest(red_shards)["splits"]["val"]["num_samples"]
    assert stored["model_id"].startswith(GAP_MODEL + "-")
    assert 1 < stored["temperature"] < 100, "fitted, not clipped at the bound"
    assert stored["ece_after"] < stored["ece_before"] and stored["nll_after"] < stored["nll_before"]

    out = tmp_path / "eval"
    result = evaluate(cfg, red_shards, gap, out, calibration=cal_path, progress=False)
    assert result["temperature"] == stored["temperature"]
    assert result["ece_before"] == result["ece"]
    assert result["top1"] > 0.3, "the constructed model should be informative"
    assert result["ece_after"] < result["ece_before"] and result["nll_after"] < result["nll_before"]
    preds = _read_csv(out / "predictions.csv")
    raw = np.array([float(r["max_prob"]) for r in preds])
    cooled = np.array([float(r["max_prob_calibrated"]) for r in preds])
    assert (cooled <= raw + 1e-6).all() and (cooled < raw).any()
    assert "## Calibration" in (out / "report.md").read_text()


def test_disabled_calibration_writes_temperature_one(red_shards: Path, gap: Path, tmp_path: Path) -> None:
    cal = calibrate(eval_cfg("calibrate.enabled=false"), red_shards, gap, tmp_path / "cal.json", progress=False)
    assert json.loads((tmp_path / "cal.json").read_text()) == json.loads(json.dumps(cal))
    assert cal["temperature"] == 1.0 and cal["enabled"] is False and "enabled is false" in cal["note"]
    assert cal["ece_before"] == cal["ece_after"] > 0.1, "the over-confident model's raw ECE is still reported"
    result = evaluate(eval_cfg(), red_shards, gap, tmp_path / "eval", calibration=tmp_path / "cal.json", progress=False)
    assert result["temperature"] == 1.0 and result["ece_after"] == pytest.approx(result["ece_before"])


def test_evaluate_refuses_a_calibration_made_for_another_model(red_shards: Path, gap: Path, resnet: Path, tmp_path: Path) -> None:
    cfg = eval_cfg("calibrate.enabled=false")
    calibrate(cfg, red_shards, resnet, tmp_path / "cal.json", progress=False)
    with pytest.raises(CheckpointError, match="calibration is for model"):
        evaluate(cfg, red_shards, gap, tmp_path / "eval", calibration=tmp_path / "cal.json", progress=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_shards_with_other_class_names(red_shards: Path, tmp_path: Path) -> None:
    from models.factory import create_model

    names = [f"c{i}" for i in range(10)]
    cfg = eval_cfg()
    model = create_model(GAP_MODEL, num_classes=10, img_size=SHARD_SIZE)
    save_checkpoint(
        tmp_path / "other.pt",
        {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": names, "model_name": GAP_MODEL,
         "img_size": SHARD_SIZE, "epoch": 0, "metrics": {}},
    )
    with pytest.raises(DataError, match="class_names"):
        evaluate(cfg, red_shards, tmp_path / "other.pt", tmp_path / "eval", progress=False)


def test_one_calibration_contract(gap: Path, tmp_path: Path) -> None:
    """The rule evaluate, predict and the registry share: the file names this model and the TTA setting it was fitted with."""
    model = TrainedModel.load(gap)
    path = tmp_path / "calibration.json"

    def cal(**fields: Any) -> Path:
        path.write_text(json.dumps({"temperature": 2.0, **fields}))
        return path

    assert model.temperature(cal(model_id=model.model_id, tta=True), tta=True) == 2.0
    with pytest.raises(CheckpointError, match="calibration is for model None"):
        model.temperature(cal(tta=False), tta=False)
    with pytest.raises(DataError, match="field 'tta'"):
        model.temperature(cal(model_id=model.model_id), tta=False)
    with pytest.raises(ConfigError, match="fitted with tta=True"):
        model.temperature(cal(model_id=model.model_id, tta=True), tta=False)
    with pytest.raises(DataError, match="positive number"):
        model.temperature(cal(model_id=model.model_id, tta=False, temperature=0), tta=False)
    disabled = cal(model_id=model.model_id, tta=True, enabled=False, temperature=1.0)
    assert model.temperature(disabled, tta=False) == 1.0, "T = 1 fits any TTA setting"

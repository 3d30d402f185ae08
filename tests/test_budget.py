"""Training to a wall-clock budget (``train.time_budget_s``) and class-balanced losses (``train.class_balance``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

import pipeline.learn.train as T
from pipeline.config import load_config
from pipeline.learn.checkpoint import load_checkpoint
from pipeline.learn.recipe import WeightedSoftTargetCrossEntropy, class_weights, loss_and_mixup
from pipeline.learn.train import plan_epochs

from conftest import four_class_data, write_four_class_shards

BASE = [
    *four_class_data(per_shard=50),
    "model.name=astroformer_pico",
    "model.img_size=32",
    "train.batch_size=16",
    "train.opt=adamw",
    "train.workers=0",
    "train.shuffle_buffer=64",
    "train.device=cpu",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_four_class_shards(tmp_path_factory.mktemp("budget_data"), load_config(None, BASE), 200)


@pytest.mark.parametrize(
    ("budget", "elapsed", "done", "last", "cap", "expected"),
    [
        (100.0, 12.0, 1, 12.0, 1000, 8),  # 88 s left at 12 s an epoch: 7 more
        (100.0, 12.0, 1, 12.0, 5, 5),  # the epoch cap still holds
        (10.0, 30.0, 2, 15.0, 1000, 2),  # over budget already: stop after the epochs done
        (5.0, 9.0, 1, 9.0, 1000, 1),  # one epoch is the least a run trains
    ],
)
def test_plan_epochs(budget: float, elapsed: float, done: int, last: float, cap: int, expected: int) -> None:
    assert plan_epochs(budget, elapsed, done, last, cap) == expected


def test_time_budget_plans_fewer_epochs_and_fits_the_schedule(shards: Path, tmp_path: Path) -> None:
    probe = T.train(load_config(None, BASE + ["train.epochs=2"]), shards, tmp_path / "probe", progress=False)
    epoch_s = probe["wall_time_s"] / 2
    budget = 4.5 * epoch_s
    cfg = load_config(
        None, BASE + ["train.epochs=200", f"train.time_budget_s={budget}", "train.lr=0.003", "train.warmup_epochs=0", "train.min_lr=1e-6"]
    )
    summary = T.train(cfg, shards, tmp_path / "run", progress=False)

    assert 2 <= summary["epochs_run"] <= 9 and summary["epochs_run"] == summary["planned_epochs"], summary
    assert summary["wall_time_s"] <= budget * 1.5, summary
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    # the cosine schedule was fitted to the planned epochs, not to the cap of 200 (which would keep the last epoch's lr
    # above 0.99 of the peak): over N >= 2 planned epochs the last one runs at most at half the peak
    assert history["lr"] < 0.6 * cfg.train.lr, history
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["planned_epochs"] == summary["planned_epochs"]


def test_class_weights_favour_rare_classes_and_keep_the_mean_weight() -> None:
    counts = [900, 90, 10]
    for kind, power in (("sqrt", 0.5), ("inverse", 1.0)):
        t = load_config(None, [f"train.class_balance={kind}"]).train
        w = class_weights(t, counts).double()
        assert w[2] / w[0] == pytest.approx((900 / 10) ** power)
        assert float((w * torch.tensor(counts, dtype=torch.float64)).sum() / sum(counts)) == pytest.approx(1.0)
    assert class_weights(load_config(None, []).train, counts) is None


def test_weighted_soft_target_loss() -> None:
    torch.manual_seed(0)
    x, target = torch.randn(8, 3), torch.softmax(torch.randn(8, 3), dim=1)
    assert WeightedSoftTargetCrossEntropy(torch.ones(3))(x, target) == pytest.approx(float(SoftTargetCrossEntropy()(x, target)))
    only_first = torch.tensor([1.0, 0.0, 0.0])
    expected = -(target[:, 0] * torch.log_softmax(x, 1)[:, 0]).mean()
    assert WeightedSoftTargetCrossEntropy(only_first)(x, target) == pytest.approx(float(expected))


def test_balanced_loss_is_used_with_and_without_mixup() -> None:
    w = torch.tensor([0.5, 2.0])
    mixed, mixup = loss_and_mixup(load_config(None, ["train.mixup_alpha=0.2"]).train, 2, w)
    assert isinstance(mixed, WeightedSoftTargetCrossEntropy) and mixup is not None
    plain, _ = loss_and_mixup(load_config(None, ["train.mixup_alpha=0"]).train, 2, w)
    assert isinstance(plain, torch.nn.CrossEntropyLoss) and torch.equal(plain.weight, w)


def test_class_balanced_run_trains(shards: Path, tmp_path: Path) -> None:
    summary = T.train(load_config(None, BASE + ["train.epochs=1", "train.class_balance=sqrt"]), shards, tmp_path, progress=False)
    assert summary["epochs_run"] == 1 and summary["planned_epochs"] is None

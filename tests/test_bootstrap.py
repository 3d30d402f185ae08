"""The bootstrap intervals: a known case, scipy's percentile bootstrap, paired differences, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.score import bootstrap as B


def _eighty_percent(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rows over 4 classes, exactly 80 % predicted right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    right = rng.permutation(n) < int(0.8 * n)
    preds = np.where(right, labels, (labels + 1) % 4)
    return labels, preds, rng.uniform(0.3, 1.0, n)


def _split(labels: np.ndarray, preds: np.ndarray, seed: int = 0) -> B.Predictions:
    conf = np.random.default_rng(seed).uniform(0.3, 1.0, len(labels))
    return B.Predictions(np.arange(len(labels)), labels, preds, conf)


def test_top1_interval_matches_the_normal_approximation() -> None:
    labels, preds, conf = _eighty_percent()
    low, high = B.metric_intervals(labels, preds, conf, 4, reps=2000)["top1"]
    half = 1.96 * np.sqrt(0.8 * 0.2 / 1000)
    assert low == pytest.approx(0.8 - half, abs=0.006)
    assert high == pytest.approx(0.8 + half, abs=0.006)


def test_top1_interval_matches_scipy_percentile_bootstrap() -> None:
    stats = pytest.importorskip("scipy.stats")
    labels, preds, conf = _eighty_percent()
    ours = B.metric_intervals(labels, preds, conf, 4, reps=4000)["top1"]
    theirs = stats.bootstrap(
        ((labels == preds).astype(float),), np.mean, n_resamples=4000, method="percentile", random_state=1
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.006)


def test_metric_values_are_the_metrics_modules() -> None:
    labels, preds, conf = _eighty_percent()
    values = B.metric_values(labels, preds, conf, 4)
    assert values["top1"] == pytest.approx(0.8)
    correct = labels == preds
    edges = np.linspace(0, 1, 16)
    which = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, 14)
    ece = sum(abs(correct[which == b].mean() - conf[which == b].mean()) * (which == b).sum() for b in np.unique(which)) / 1000
    assert values["ece"] == pytest.approx(ece)


def test_paired_interval_finds_a_planted_difference() -> None:
    a, b = [], []
    for s in range(3):
        labels, preds, _ = _eighty_percent(300, seed=s)
        better = preds.copy()
        wrong = np.flatnonzero(labels != preds)[:45]  # B right on 15 % more rows
        better[wrong] = labels[wrong]
        a.append(_split(labels, preds, s))
        b.append(_split(labels, better, s))
    diff = B.paired_intervals(a, b, 4, reps=500)["top1"]
    assert diff.mean == pytest.approx(0.15)
    assert 0 < diff.low < 0.15 < diff.high


def test_identical_runs_differ_by_exactly_zero() -> None:
    runs = [_split(*_eighty_percent(200, seed=s)[:2], seed=s) for s in range(3)]
    for summary in B.paired_intervals(runs, runs, 4, reps=200).values():
        assert (summary.mean, summary.std, summary.low, summary.high) == (0.0, 0.0, 0.0, 0.0)


def test_paired_refuses_different_galaxies() -> None:
    runs = [_split(*_eighty_percent(200, seed=s)[:2], seed=s) for s in range(3)]
    other = [B.Predictions(r.ids + 1, r.labels, r.preds, r.confidences) for r in runs]
    with pytest.raises(ValueError, match="different galaxies"):
        B.paired_intervals(runs, other, 4, reps=10)


def test_fixed_seed_gives_identical_output_and_another_seed_does_not() -> None:
    runs = [_split(*_eighty_percent(200, seed=s)[:2], seed=s) for s in range(3)]
    first = B.split_intervals(runs, 4, reps=300, seed=7)
    assert B.split_intervals(runs, 4, reps=300, seed=7) == first
    assert B.split_intervals(runs, 4, reps=300, seed=8) != first


def test_over_splits_the_statistic_is_the_mean_of_the_splits() -> None:
    runs = [_split(*_eighty_percent(200, seed=s)[:2], seed=s) for s in range(3)]
    runs[0] = _split(runs[0].labels, runs[0].labels, 0)  # split 0: all right
    top1 = B.split_intervals(runs, 4, reps=300)["top1"]
    assert top1.mean == pytest.approx((1.0 + 0.8 + 0.8) / 3)
    assert top1.std == pytest.approx(np.std([1.0, 0.8, 0.8], ddof=1))
    assert top1.low < top1.mean < top1.high

"""Bootstrap intervals of the test metrics: for one run, for a model over splits, and paired between two models.

A test split of a few hundred galaxies leaves a standard error of one to two points on top-1, so a single
number says little; these percentile intervals say how much. Numpy only and seeded
(``np.random.default_rng(seed)``), so the same seed gives the same interval. The metrics themselves are
``pipeline.score.metrics``'s, so an interval is of exactly the number ``evaluate`` reports.

Over splits the statistic is the mean over splits of the per-split metric; a replicate resamples rows
within each split independently. A paired difference (B - A) resamples the same rows for both models,
which needs both to have been tested on the same galaxies of each split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.score import metrics as M

METRICS: tuple[str, ...] = ("top1", "macro_f1", "balanced_accuracy", "ece")
"""The bootstrapped metrics, in table order; ``ece`` is the top-label ECE of the given confidences."""


@dataclass(frozen=True)
class Predictions:
    """One model's test predictions on one split: row ids (to pair models), labels, predictions, top probabilities."""

    ids: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    confidences: np.ndarray


@dataclass(frozen=True)
class Summary:
    """A metric over splits: the mean of the per-split values, their standard deviation, and the bootstrap interval."""

    mean: float
    std: float
    low: float
    high: float


def _ece(correct: np.ndarray, confidences: np.ndarray, bins: int) -> float:
    """Top-label ECE through ``metrics.expected_calibration_error``: a two-column score whose top is the confidence,
    labelled 0 where the prediction was right, so its binning is the metrics module's."""
    scores = np.stack([confidences, np.zeros_like(confidences)], axis=1)
    return M.expected_calibration_error(scores, np.where(correct, 0, 1), bins)


def _from_cm(cm: np.ndarray) -> dict[str, float]:
    return {"top1": M.accuracy(cm), "macro_f1": M.macro_f1(cm), "balanced_accuracy": M.balanced_accuracy(cm)}


def metric_values(labels: np.ndarray, preds: np.ndarray, confidences: np.ndarray, num_classes: int, bins: int = 15) -> dict[str, float]:
    """top1, macro_f1, balanced_accuracy and the top-label ece of one set of predictions."""
    y, p, c = np.asarray(labels, np.int64), np.asarray(preds, np.int64), np.asarray(confidences, np.float64)
    return {**_from_cm(M.confusion_matrix(y, p, num_classes)), "ece": _ece(y == p, c, bins)}


def _resampled_values(
    y: np.ndarray, p: np.ndarray, c: np.ndarray, idx: np.ndarray, num_classes: int, bins: int
) -> dict[str, np.ndarray]:
    """Every metric for each replicate row of ``idx`` (reps, n): confusion matrices by one ``np.bincount``."""
    reps = len(idx)
    flat = (np.arange(reps)[:, None] * num_classes + y[idx]) * num_classes + p[idx]
    cms = np.bincount(flat.ravel(), minlength=reps * num_classes**2).reshape(reps, num_classes, num_classes)
    rows = [_from_cm(cm) for cm in cms]
    out = {k: np.array([r[k] for r in rows]) for k in ("top1", "macro_f1", "balanced_accuracy")}
    correct = y == p
    out["ece"] = np.array([_ece(correct[i], c[i], bins) for i in idx])
    return out


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _check(level: float, reps: int) -> None:
    if not 0 < level < 1 or reps < 1:
        raise ValueError(f"expected 0 < level < 1 and reps >= 1, got level={level}, reps={reps}")


def metric_intervals(
    labels: np.ndarray,
    preds: np.ndarray,
    confidences: np.ndarray,
    num_classes: int,
    *,
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bins: int = 15,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric, resampling the test galaxies with replacement."""
    _check(level, reps)
    y, p, c = np.asarray(labels, np.int64), np.asarray(preds, np.int64), np.asarray(confidences, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(reps, len(y)))
    values = _resampled_values(y, p, c, idx, num_classes, bins)
    return {k: _interval(v, level) for k, v in values.items()}


def _split_indices(sizes: Sequence[int], reps: int, seed: int) -> list[np.ndarray]:
    """Per split, (reps, n_split) row indices resampled within that split; one generator, so one seed fixes all."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=(reps, n)) for n in sizes]


def _mean_over_splits(
    runs: Sequence[Predictions], indices: Sequence[np.ndarray], num_classes: int, bins: int
) -> dict[str, np.ndarray]:
    """Per replicate, the mean over splits of each metric."""
    per_split = [_resampled_values(r.labels, r.preds, r.confidences, i, num_classes, bins) for r, i in zip(runs, indices)]
    return {k: np.mean([s[k] for s in per_split], axis=0) for k in METRICS}


def _summaries(per_split: Sequence[dict[str, float]], replicates: dict[str, np.ndarray], level: float) -> dict[str, Summary]:
    """Point values over splits (mean, sample std) with the percentile interval of the replicates."""
    out = {}
    for k in METRICS:
        values = np.array([s[k] for s in per_split])
        out[k] = Summary(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, *_interval(replicates[k], level))
    return out


def split_intervals(
    runs: Sequence[Predictions], num_classes: int, *, reps: int = 1000, seed: int = 0, level: float = 0.95, bins: int = 15
) -> dict[str, Summary]:
    """One model over several splits: the mean and std over splits of each metric, and its stratified bootstrap interval."""
    _check(level, reps)
    per_split = [metric_values(r.labels, r.preds, r.confidences, num_classes, bins) for r in runs]
    indices = _split_indices([len(r.labels) for r in runs], reps, seed)
    return _summaries(per_split, _mean_over_splits(runs, indices, num_classes, bins), level)


def _check_paired(a: Sequence[Predictions], b: Sequence[Predictions]) -> None:
    """Both models must have been tested on the same galaxies, split by split, in the same row order."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same splits: {len(a)} against {len(b)}")
    for i, (ra, rb) in enumerate(zip(a, b)):
        if not np.array_equal(ra.ids, rb.ids) or not np.array_equal(ra.labels, rb.labels):
            raise ValueError(f"split {i}: the two models were tested on different galaxies (ids or labels differ)")


def paired_intervals(
    a: Sequence[Predictions],
    b: Sequence[Predictions],
    num_classes: int,
    *,
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bins: int = 15,
) -> dict[str, Summary]:
    """B minus A per metric: mean and std over splits of the per-split difference, and the paired bootstrap interval
    (the same resampled rows for both models on each split)."""
    _check(level, reps)
    _check_paired(a, b)
    va = [metric_values(r.labels, r.preds, r.confidences, num_classes, bins) for r in a]
    vb = [metric_values(r.labels, r.preds, r.confidences, num_classes, bins) for r in b]
    diffs = [{k: sb[k] - sa[k] for k in METRICS} for sa, sb in zip(va, vb)]
    indices = _split_indices([len(r.labels) for r in a], reps, seed)
    ra, rb = _mean_over_splits(a, indices, num_classes, bins), _mean_over_splits(b, indices, num_classes, bins)
    return _summaries(diffs, {k: rb[k] - ra[k] for k in METRICS}, level)

"""Classification and calibration metrics as pure functions of logits and labels: the only implementation.

Training's validation pass, ``calibrate``, ``evaluate`` and the registry all use these functions, so a
metric means the same everywhere. Numpy (and torch for the temperature fit) only, so the stages do not
depend on scikit-learn; the tests check every metric against scikit-learn. Inputs may be numpy arrays
or torch tensors on any device. ``logits`` may be any scores whose softmax is the predicted
distribution, e.g. the log of test-time-augmented averaged probabilities; :func:`softmax` with a
temperature is the one temperature rule (``pipeline.score.trained_model``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


def _np(x: ArrayLike, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _logits_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    z = _np(logits, np.float64)
    y = _np(labels, np.int64)
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {z.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must be in [0, {z.shape[1]}), got range [{y.min()}, {y.max()}]")
    return z, y


def softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, shifted by the row maximum so it never overflows."""
    z = _np(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    z = _np(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest scores (ties broken by class index)."""
    z, y = _logits_labels(logits, labels)
    if not 1 <= k <= z.shape[1]:
        raise ValueError(f"k must be in [1, {z.shape[1]}], got {k}")
    if len(y) == 0:
        return float("nan")
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def confusion_matrix(labels: ArrayLike, preds: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class (scikit-learn's orientation)."""
    y = _np(labels, np.int64)
    p = _np(preds, np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels and preds differ in shape: {y.shape} vs {p.shape}")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    """Top-1 accuracy from a confusion matrix: the diagonal's share of all samples."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix; undefined ratios are 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, predicted + support)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur as a label or a prediction.

    A class absent from both would score an arbitrary 0 and penalise a test set that merely lacks it.
    """
    cm = np.asarray(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    if not present.any():
        return float("nan")
    return float(per_class_metrics(cm)["f1"][present].mean())


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur as a label (classes without support have no recall)."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    if not (support > 0).any():
        return float("nan")
    return float(per_class_metrics(cm)["recall"][support > 0].mean())


def error_contributions(cm: np.ndarray) -> np.ndarray:
    """Per class: errors whose true class is that class / all samples (Astroformer's appendix table).

    The contributions sum to the overall error rate, so they show where the errors come from.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        return np.zeros(len(cm))
    return (cm.sum(axis=1) - np.diag(cm)) / total


def calibration_bins(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability-diagram data: per equal-width confidence bin ``(lo, hi]``, count, mean confidence and accuracy."""
    p, y = _logits_labels(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    return {
        "edges": edges,
        "count": count.astype(np.int64),
        "confidence": _safe_div(conf_sum, count),
        "accuracy": _safe_div(acc_sum, count),
    }


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """ECE: sample-weighted mean |accuracy - confidence| over equal-width bins of the top probability."""
    b = calibration_bins(probs, labels, bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    return float((b["count"] / n * np.abs(b["accuracy"] - b["confidence"])).sum())


def nll(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy, nats) of the labels under ``softmax(logits / T)``."""
    z, y = _logits_labels(logits, labels)
    if len(y) == 0:
        return float("nan")
    return float(-log_softmax(z, temperature)[np.arange(len(y)), y].mean())


def entropy(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Per-sample entropy (nats) of the predicted distribution: high means the model hesitates."""
    logp = log_softmax(logits, temperature)
    return -(np.exp(logp) * logp).sum(axis=1)


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits, for people: 0.572, not 0.5720000000000001."""
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2


def fit_temperature(logits: ArrayLike, labels: ArrayLike, max_iter: int = 200) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Optimised over log T (so T stays positive) with LBFGS in float64. The result is clipped to
    [0.01, 100]: on a validation set the model classifies perfectly the optimum is T -> 0, which would
    make every later mistake infinitely confident.
    """
    z_np, y_np = _logits_labels(logits, labels)
    if len(y_np) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    z = torch.from_numpy(z_np)
    y = torch.from_numpy(y_np)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        raise ValueError("temperature fit diverged (non-finite logits?)")
    return min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)


def summarize(
    logits: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    *,
    bins: int = 15,
) -> dict[str, Any]:
    """Every headline metric of one split as JSON-ready values; ``ece``/``nll`` are of the raw logits."""
    z, y = _logits_labels(logits, labels)
    if z.shape[1] != len(class_names):
        raise ValueError(f"logits have {z.shape[1]} classes but {len(class_names)} class names were given")
    cm = confusion_matrix(y, z.argmax(axis=1), len(class_names))
    pc = per_class_metrics(cm)
    contrib = error_contributions(cm)
    top1 = topk_accuracy(z, y, 1)
    return {
        "num_samples": int(len(y)),
        "top1": top1,
        "top5": topk_accuracy(z, y, 5) if len(class_names) >= 5 else None,
        "macro_f1": macro_f1(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "error_rate": 1.0 - top1,
        "ece": expected_calibration_error(softmax(z), y, bins),
        "nll": nll(z, y),
        "mean_entropy": float(entropy(z).mean()) if len(y) else float("nan"),
        "per_class": {
            name: {
                "precision": float(pc["precision"][i]),
                "recall": float(pc["recall"][i]),
                "f1": float(pc["f1"][i]),
                "support": int(pc["support"][i]),
                "error_contribution": float(contrib[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion": cm.tolist(),
    }

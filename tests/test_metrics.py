"""Metrics against scikit-learn (the reference implementation) and calibration on constructed models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from pipeline.score import metrics as M


def _random_case(seed: int, n: int = 500, c: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += rng.uniform(0, 2.5, n)
    return logits, labels


def _calibrated_model(seed: int, n: int, c: int = 10, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, size=(n, c))
    p = M.softmax(logits)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed: int) -> None:
    logits, labels = _random_case(seed)
    c = logits.shape[1]
    preds = logits.argmax(axis=1)
    cm = M.confusion_matrix(labels, preds, c)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, preds, labels=range(c)))
    assert M.topk_accuracy(logits, labels, 1) == pytest.approx(skm.accuracy_score(labels, preds))
    assert M.topk_accuracy(logits, labels, 3) == pytest.approx(skm.top_k_accuracy_score(labels, logits, k=3, labels=range(c)))
    assert M.macro_f1(cm) == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert M.balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=range(c), zero_division=0)
    pc = M.per_class_metrics(cm)
    np.testing.assert_allclose(pc["precision"], p)
    np.testing.assert_allclose(pc["recall"], r)
    np.testing.assert_allclose(pc["f1"], f)
    np.testing.assert_array_equal(pc["support"], s)
    assert M.nll(logits, labels) == pytest.approx(skm.log_loss(labels, M.softmax(logits), labels=range(c)))


def test_validation_pass_metrics_from_torch_tensors_match_sklearn() -> None:
    """Training's validation pass: CPU labels and predicted classes from the device, counts summed over batches."""
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 5, 300)  # class 5 is never predicted
    cm = sum(M.confusion_matrix(torch.from_numpy(y[i : i + 64]), torch.from_numpy(p[i : i + 64]), 7) for i in range(0, 300, 64))
    assert M.accuracy(cm) == pytest.approx(skm.accuracy_score(y, p))
    assert M.macro_f1(cm) == pytest.approx(skm.f1_score(y, p, average="macro"))  # class 6 never occurs
    assert np.isnan(M.accuracy(np.zeros((3, 3), np.int64)))


def test_absent_and_never_predicted_classes_match_sklearn() -> None:
    """Class 3 is never predicted (precision 0/0), class 4 never occurs at all."""
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
    preds = np.array([0, 1, 1, 1, 2, 0, 2, 0, 0, 2])
    cm = M.confusion_matrix(labels, preds, 5)
    assert M.macro_f1(cm) == pytest.approx(skm.f1_score(labels, preds, average="macro", zero_division=0))
    assert M.balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=range(5), zero_division=0)
    pc = M.per_class_metrics(cm)
    np.testing.assert_allclose(pc["precision"], p)
    np.testing.assert_allclose(pc["recall"], r)
    np.testing.assert_allclose(pc["f1"], f)


def test_error_contributions_sum_to_error_rate() -> None:
    logits, labels = _random_case(3)
    cm = M.confusion_matrix(labels, logits.argmax(axis=1), logits.shape[1])
    contrib = M.error_contributions(cm)
    assert contrib.sum() == pytest.approx(1.0 - M.topk_accuracy(logits, labels, 1))
    wrong = logits.argmax(axis=1) != labels
    for c in range(logits.shape[1]):
        assert contrib[c] == pytest.approx((wrong & (labels == c)).sum() / len(labels))


def test_summarize_is_consistent_and_top5_needs_five_classes() -> None:
    logits, labels = _random_case(4, c=7)
    names = [f"class {i}" for i in range(7)]
    s = M.summarize(logits, labels, names, bins=10)
    assert s["top5"] == pytest.approx(M.topk_accuracy(logits, labels, 5))
    assert s["error_rate"] == pytest.approx(sum(pc["error_contribution"] for pc in s["per_class"].values()))
    assert sum(pc["support"] for pc in s["per_class"].values()) == len(labels) == s["num_samples"]
    assert np.asarray(s["confusion"]).sum() == len(labels)
    small = M.summarize(logits[:, :3], labels % 3, names[:3])
    assert small["top5"] is None


def test_ece_is_near_zero_for_a_calibrated_model_and_large_for_an_overconfident_one() -> None:
    logits, labels = _calibrated_model(0, 40_000)
    calibrated = M.expected_calibration_error(M.softmax(logits), labels, bins=15)
    overconfident = M.expected_calibration_error(M.softmax(5 * logits), labels, bins=15)
    assert calibrated < 0.015
    assert overconfident > 0.2


def test_ece_matches_a_hand_computed_example() -> None:
    """Two bins: (0, .5] holds nothing, (.5, 1] holds confidences .6 and .9 with one of two right."""
    probs = np.array([[0.6, 0.4], [0.1, 0.9]])
    labels = np.array([0, 0])
    assert M.expected_calibration_error(probs, labels, bins=2) == pytest.approx(abs(0.5 - 0.75))
    b = M.calibration_bins(probs, labels, bins=2)
    np.testing.assert_array_equal(b["count"], [0, 2])


def test_entropy_bounds() -> None:
    uniform = np.zeros((2, 4))
    assert M.entropy(uniform) == pytest.approx(np.full(2, np.log(4)))
    sharp = np.array([[50.0, 0, 0, 0]])
    assert M.entropy(sharp)[0] < 1e-10


def test_fit_temperature_undoes_overconfidence() -> None:
    logits, labels = _calibrated_model(1, 10_000)
    t = M.fit_temperature(5 * logits, labels, max_iter=100)
    assert t > 1
    assert t == pytest.approx(5.0, rel=0.1)
    before = M.expected_calibration_error(M.softmax(5 * logits), labels, 15)
    after = M.expected_calibration_error(M.softmax(5 * logits, t), labels, 15)
    assert after < before / 5
    assert M.nll(5 * logits, labels, t) < M.nll(5 * logits, labels)
    assert M.fit_temperature(torch.from_numpy(logits), torch.from_numpy(labels)) == pytest.approx(1.0, abs=0.05)


def test_fit_temperature_underconfident_model_gets_t_below_one() -> None:
    logits, labels = _calibrated_model(2, 5_000)
    assert M.fit_temperature(logits / 3, labels) < 1


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        M.topk_accuracy(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        M.topk_accuracy(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError):
        M.fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))

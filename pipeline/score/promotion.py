"""The promotion rule of the model registry, as pure functions of metric values.

Kept apart from the registry's files and locks so the rule reads (and is tested) on its own: the
floor and the margin over the majority-class classifier always apply, then the candidate must
strictly beat production on the same test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import RegistryConfig
from pipeline.errors import ConfigError
from pipeline.score import metrics as M

STORED = "registered test metrics"
"""The basis of a comparison made on the metrics evaluate wrote at registration (no re-scoring)."""


@dataclass(frozen=True)
class Rule:
    """The promotion thresholds of ``registry`` in params.yaml; every metric is "higher is better"."""

    metric: str
    min_value: float
    min_margin_over_majority: float

    @classmethod
    def from_config(cls, cfg: RegistryConfig) -> Rule:
        return cls(cfg.metric, cfg.min_value, cfg.min_margin_over_majority)


@dataclass(frozen=True)
class Decision:
    """Why a candidate was (not) promoted: what ``history.jsonl``, the CLI and the flow's artifact show."""

    promote: bool
    reason: str
    metric: str
    candidate_id: str
    candidate_value: float | None
    production_id: str | None
    production_value: float | None
    majority_value: float | None = None
    basis: str = STORED
    num_samples: int | None = None
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (NaN, missing, bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def majority_baseline(class_counts: Sequence[int], metric: str) -> float:
    """``metric`` of always predicting the most frequent class: the score of a model that learned nothing.

    Built as that classifier's confusion matrix and scored by ``pipeline.score.metrics``, so it is exactly
    what evaluate would report (top1 = p, balanced accuracy = 1/K, macro-F1 = 2p/(1+p)/K).
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.sum() == 0:
        return float("nan")
    majority = int(counts.argmax())
    cm = np.zeros((len(counts), len(counts)), dtype=np.int64)
    cm[:, majority] = counts
    scores = {
        "top1": lambda: float(counts[majority] / counts.sum()),
        "macro_f1": lambda: M.macro_f1(cm),
        "balanced_accuracy": lambda: M.balanced_accuracy(cm),
    }
    if metric not in scores:
        raise ConfigError(f"registry.metric: no majority baseline for {metric!r}; use one of {sorted(scores)}")
    return scores[metric]()


def decide(
    candidate_id: str,
    candidate_value: float | None,
    *,
    rule: Rule,
    majority_value: float | None,
    production_id: str | None = None,
    production_value: float | None = None,
    same_classes: bool = True,
    basis: str = STORED,
    num_samples: int | None = None,
) -> Decision:
    """The promotion rule, pure: the floor and the majority margin always apply; then production must lose.

    A tie keeps production, so re-running the same training never churns it. Values must come from
    the same test split (``basis`` says which); a class-list change is never promoted automatically.
    """
    cand, prod, major = finite(candidate_value), finite(production_value), finite(majority_value)
    metric = rule.metric

    def made(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, metric, candidate_id, cand, production_id, prod, major, basis, num_samples)

    if production_id == candidate_id:
        return made(False, "the candidate already is the production model")
    if cand is None:
        return made(False, f"the candidate has no finite {metric!r}")
    if cand < rule.min_value:
        return made(False, f"{metric} {cand:.4f} is below the floor registry.min_value={rule.min_value:g}")
    if major is None:
        return made(False, f"the majority-class baseline of {metric!r} is unknown (empty test split?)")
    if cand < major + rule.min_margin_over_majority:
        return made(
            False,
            f"{metric} {cand:.4f} does not beat the majority-class classifier's {major:.4f} "
            f"by registry.min_margin_over_majority={rule.min_margin_over_majority:g}",
        )
    if not same_classes:
        return made(False, "the class lists differ from production's; only `promote --force --reason ...` can switch")
    if production_id is None:
        return made(True, "there is no production model yet and the candidate clears the floor and the majority margin")
    if prod is None:
        return made(False, f"production has no finite {metric!r} on this test split; compare by hand and use --force")
    if cand > prod:
        return made(True, f"{metric} {cand:.4f} beats production's {prod:.4f}")
    return made(False, f"{metric} {cand:.4f} does not beat production's {prod:.4f}")

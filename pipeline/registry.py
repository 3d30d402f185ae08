"""A file-system model registry: candidates, one production model, and the rule that promotes.

Layout under ``registry.root``::

    candidates/<model_id>/   model.pt, calibration.json, metrics.json, lineage.json (+ report.md, confusion.png)
    production -> candidates/<model_id>    a symlink, swapped atomically by ``promote``
    history.jsonl            one line per promotion decision, promoted or not
    .lock                    serialises compare-and-promote between concurrent runs

Plain functions without Prefect, so the CLI, DVC or a notebook can register and promote too.
A candidate directory is written once (under a temporary name, then renamed) and never changed, so
whoever reads ``production/`` sees one complete model, whichever moment the symlink moved.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import AstroflowError
from pipeline.io import atomic_dir, read_json

CANDIDATES = "candidates"
PRODUCTION = "production"
HISTORY = "history.jsonl"
MODEL_FILE = "model.pt"
CALIBRATION_FILE = "calibration.json"  # the name ``pipeline.predict`` looks for beside a checkpoint
METRICS_FILE = "metrics.json"
LINEAGE_FILE = "lineage.json"
HEADLINE_METRICS = ("top1", "macro_f1", "balanced_accuracy", "ece", "nll")


class RegistryError(AstroflowError):
    """A registry that is missing a model it should have, or is laid out in a way we did not write."""


@dataclass(frozen=True)
class Decision:
    """Why a candidate was (not) promoted: what ``history.jsonl`` and the flow's artifact show."""

    promote: bool
    reason: str
    metric: str
    candidate_id: str
    candidate_value: float | None
    production_id: str | None
    production_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    value = (metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def decide(
    candidate_id: str,
    candidate_metrics: Mapping[str, Any],
    production_id: str | None,
    production_metrics: Mapping[str, Any] | None,
    metric: str,
) -> Decision:
    """The promotion rule: promote when there is no production model or the candidate is strictly better.

    Every registry metric is "higher is better". A tie keeps the incumbent, so re-running the same
    training never churns production; a candidate without the metric is never promoted over one
    that has it.
    """
    cand = _value(candidate_metrics, metric)
    prod = _value(production_metrics, metric)

    def made(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, metric, candidate_id, cand, production_id, prod)

    if production_id == candidate_id:
        return made(False, "the candidate already is the production model")
    if cand is None:
        return made(False, f"the candidate has no finite {metric!r}")
    if production_id is None:
        return made(True, "there is no production model yet")
    if prod is None:
        return made(True, f"the production model has no finite {metric!r} to compare with")
    if cand > prod:
        return made(True, f"{metric} {cand:.4f} beats production's {prod:.4f}")
    return made(False, f"{metric} {cand:.4f} does not beat production's {prod:.4f}")


def code_version(repo: Path | None = None) -> dict[str, Any]:
    """The code that trained a model: git commit and dirty flag when available, plus package versions."""
    from importlib.metadata import PackageNotFoundError, version

    repo = repo or Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=30, check=True
        ).stdout
        out["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in ("astroflow", "torch", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def candidate_dir(root: Path, model_id: str) -> Path:
    return Path(root) / CANDIDATES / model_id


def register_candidate(
    root: Path,
    model_id: str,
    checkpoint: Path,
    *,
    metrics: Mapping[str, Any],
    lineage: Mapping[str, Any],
    calibration: Path | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Copy a trained model and its record into ``candidates/<model_id>/`` (once; later calls keep the first).

    The checkpoint is copied byte for byte, so ``pipeline.checkpoint.model_id`` of the copy is ``model_id``.
    """
    target = candidate_dir(root, model_id)
    if (target / LINEAGE_FILE).is_file():
        return target
    with atomic_dir(target) as tmp:
        shutil.copy2(checkpoint, tmp / MODEL_FILE)
        if calibration is not None and Path(calibration).is_file():
            shutil.copy2(calibration, tmp / CALIBRATION_FILE)
        for name, path in (extra_files or {}).items():
            if Path(path).is_file():
                shutil.copy2(path, tmp / name)
        (tmp / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, default=str) + "\n")
        record = {"model_id": model_id, "registered_at": _now(), **dict(lineage)}
        (tmp / LINEAGE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return target


def production_dir(root: Path) -> Path | None:
    """The production model's directory, or None when nothing was promoted yet."""
    link = Path(root) / PRODUCTION
    if not link.exists():
        return None
    if not link.is_symlink():
        raise RegistryError(f"{link}: expected a symlink to {CANDIDATES}/<model_id>, found a plain directory")
    return link.resolve()


def production_id(root: Path) -> str | None:
    path = production_dir(root)
    return None if path is None else path.name


def production_checkpoint(root: Path) -> Path:
    """The production checkpoint (under ``production/``, so it follows later promotions)."""
    path = production_dir(root)
    if path is None:
        raise RegistryError(f"{Path(root) / PRODUCTION}: no production model yet; run the retrain flow first")
    return path / MODEL_FILE


def read_record(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, lineage) of a registered model directory."""
    return read_json(Path(directory) / METRICS_FILE), read_json(Path(directory) / LINEAGE_FILE)


@contextmanager
def _registry_lock(root: Path) -> Iterator[None]:
    """Blocking ``flock``: two retrain runs finishing together compare against the same production model."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _switch(root: Path, model_id: str) -> None:
    """Point ``production`` at the candidate with one ``rename``: readers never see it missing."""
    link = root / PRODUCTION
    tmp = root / f".{PRODUCTION}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(Path(CANDIDATES) / model_id, tmp)
    os.replace(tmp, link)


def promote_if_better(root: Path, model_id: str, metric: str, *, context: Mapping[str, Any] | None = None) -> Decision:
    """Compare the registered candidate with production on ``metric`` and switch if it wins; log the decision."""
    root = Path(root)
    cand = candidate_dir(root, model_id)
    if not (cand / LINEAGE_FILE).is_file():
        raise RegistryError(f"{cand}: not a registered candidate")
    with _registry_lock(root):
        cand_metrics, _ = read_record(cand)
        prod_dir = production_dir(root)
        prod_metrics = read_record(prod_dir)[0] if prod_dir is not None else None
        decision = decide(model_id, cand_metrics, prod_dir.name if prod_dir else None, prod_metrics, metric)
        if decision.promote:
            _switch(root, model_id)
        with open(root / HISTORY, "a") as fh:
            fh.write(json.dumps({"at": _now(), **decision.to_dict(), **dict(context or {})}, default=str) + "\n")
    return decision


def set_production(root: Path, model_id: str, reason: str) -> None:
    """Force ``model_id`` into production (a rollback), bypassing the rule but not the history."""
    root = Path(root)
    if not (candidate_dir(root, model_id) / LINEAGE_FILE).is_file():
        raise RegistryError(f"{candidate_dir(root, model_id)}: not a registered candidate")
    with _registry_lock(root):
        previous = production_id(root)
        _switch(root, model_id)
        with open(root / HISTORY, "a") as fh:
            record = {"at": _now(), "promote": True, "forced": True, "reason": reason, "candidate_id": model_id, "production_id": previous}
            fh.write(json.dumps(record) + "\n")


def history(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()

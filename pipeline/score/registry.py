"""A file-system model registry: candidates, one production model, promoted by the rule of ``promotion``.

Layout under ``registry.root``::

    candidates/<model_id>/   model.pt, calibration.json, metrics.json, lineage.json, split.parquet
                             (+ report.md, confusion.png, and the model card model_card.{md,json})
    production -> candidates/<model_id>    a symlink, swapped atomically by ``promote`` and ``rollback``
    history.jsonl            one line per promotion decision (promoted or not) and per rollback
    .lock                    serialises register, compare-and-promote and rollback between processes

Plain functions without Prefect, so the CLI (``astroflow registry``), a flow or a notebook register
and promote by the same rule. A candidate directory is written once (under a temporary name, then
renamed) and never changed, so whoever reads ``production/`` sees one complete model.

Metrics of different test sets are not comparable: when the candidate's test split is not
production's (other data, other split), both models are re-scored on the candidate's test split minus
every galaxy production trained on, using the split tables saved at registration.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.score import metrics as M
from pipeline.config import Config
from pipeline.errors import AstroflowError
from pipeline.io import atomic_dir, read_json
from pipeline.score.calibrate import CALIBRATION_FILE
from pipeline.score.card import CARD_FILES, CARD_JSON, CARD_MD
from pipeline.score.promotion import STORED, Decision, Rule, decide, finite, majority_baseline
from pipeline.score.trained_model import TrainedModel

CANDIDATES = "candidates"
PRODUCTION = "production"
HISTORY = "history.jsonl"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
LINEAGE_FILE = "lineage.json"
SPLIT_FILE = "split.parquet"
EVAL_FILES = ("report.md", "confusion.png", *CARD_FILES)
HEADLINE_METRICS = ("top1", "macro_f1", "balanced_accuracy", "ece", "nll")


class RegistryError(AstroflowError):
    """A registry request a person can get wrong: unknown model, stale workspace, rollback with no history."""


# ------------------------------------------------------------------ registration and lineage


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


def register_model(
    root: Path,
    cfg: Config,
    *,
    checkpoint: Path,
    calibration: Path | None,
    eval_dir: Path,
    shards_dir: Path,
    source: str,
    stage_keys: Mapping[str, str] | None = None,
    flow_run_id: str | None = None,
) -> str:
    """Copy a trained and evaluated model, its split table and lineage into ``candidates/<model_id>/``.

    Registering the same model again changes nothing, so a re-run flow or a repeated CLI call is harmless.
    The evaluation and calibration must be of this very checkpoint: a stale workspace is refused.
    """
    root, checkpoint, eval_dir, shards_dir = Path(root), Path(checkpoint), Path(eval_dir), Path(shards_dir)
    if not checkpoint.is_file():
        raise RegistryError(f"{checkpoint}: no trained model; run `dvc repro` or `astroflow run` first")
    model = TrainedModel.load(checkpoint)
    mid = model.model_id
    target = candidate_dir(root, mid)
    if (target / LINEAGE_FILE).is_file():
        return mid
    metrics = _evaluation(eval_dir, mid)
    lineage = _lineage(cfg, model, metrics, shards_dir, source, stage_keys, flow_run_id)
    files = {MODEL_FILE: checkpoint, METRICS_FILE: eval_dir / METRICS_FILE, SPLIT_FILE: _split_table(shards_dir)}
    if calibration is not None:
        model.temperature(calibration, tta=bool(metrics.get("tta")))  # the contract predict applies to the copy
        files[CALIBRATION_FILE] = Path(calibration)
    files.update({name: eval_dir / name for name in EVAL_FILES if (eval_dir / name).is_file()})
    with _registry_lock(root):
        if not (target / LINEAGE_FILE).is_file():
            with atomic_dir(target) as tmp:
                for name, path in files.items():
                    shutil.copy2(path, tmp / name)
                record = {"model_id": mid, "registered_at": _now(), **lineage}
                (tmp / LINEAGE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return mid


def _evaluation(eval_dir: Path, mid: str) -> dict[str, Any]:
    """evaluate's metrics.json, refused unless it scores this checkpoint (not one trained before it)."""
    path = eval_dir / METRICS_FILE
    if not path.is_file():
        raise RegistryError(f"{path}: no evaluation; run `astroflow evaluate` (or `dvc repro`) first")
    metrics = read_json(path)
    if metrics.get("model_id") != mid:
        raise RegistryError(f"{path}: evaluates model {metrics.get('model_id')!r}, not {mid!r}; re-run evaluate")
    return metrics


def _split_table(shards_dir: Path) -> Path:
    from pipeline.data.shards import SPLIT_TABLE

    path = shards_dir / SPLIT_TABLE
    if not path.is_file():
        raise RegistryError(f"{path}: no split table (id -> split); re-run `astroflow shard`")
    return path


def _lineage(
    cfg: Config,
    model: TrainedModel,
    metrics: Mapping[str, Any],
    shards_dir: Path,
    source: str,
    stage_keys: Mapping[str, str] | None,
    flow_run_id: str | None,
) -> dict[str, Any]:
    """What made the model and what it was tested on: enough to re-score it or to retrain it."""
    from pipeline.data.shards import load_manifest

    manifest = load_manifest(shards_dir)
    names = model.class_names
    model.check_classes(manifest["class_names"], f"{shards_dir} (shards)")
    counts = manifest["splits"]["test"]["class_counts"]
    return {
        "source": source,
        "model_name": model.model_name,
        "class_names": names,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "data_hash": manifest["data_hash"],
        "split": manifest["split"],
        "shards_dir": str(shards_dir.resolve()),
        "test_class_counts": [int(counts[name]) for name in names],
        "metrics": {k: metrics.get(k) for k in HEADLINE_METRICS},
        "tta": metrics.get("tta"),
        "temperature": metrics.get("temperature"),
        "code": code_version(),
        "stage_keys": dict(stage_keys) if stage_keys else None,
        "flow_run_id": flow_run_id,
    }


# ------------------------------------------------------------------ reading


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
        raise RegistryError(f"{Path(root) / PRODUCTION}: no production model yet; run `astroflow registry promote` first")
    return path / MODEL_FILE


def read_record(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, lineage) of a registered model directory."""
    if not (Path(directory) / LINEAGE_FILE).is_file():
        raise RegistryError(f"{directory}: not a registered model (no {LINEAGE_FILE}); it was not put there by `register`")
    return read_json(Path(directory) / METRICS_FILE), read_json(Path(directory) / LINEAGE_FILE)


def _registered(root: Path, model_id: str) -> Path:
    path = candidate_dir(root, model_id)
    if not (path / LINEAGE_FILE).is_file():
        raise RegistryError(f"{model_id!r}: no such registered model in {root} (see `astroflow registry list`)")
    return path


def list_models(root: Path) -> list[dict[str, Any]]:
    """One summary row per registered model, oldest first."""
    root = Path(root)
    prod = production_id(root)
    rows = []
    for lineage_path in (root / CANDIDATES).glob(f"[!.]*/{LINEAGE_FILE}"):
        metrics, lineage = read_record(lineage_path.parent)
        rows.append(
            {
                "model_id": lineage["model_id"],
                "registered_at": lineage.get("registered_at"),
                "source": lineage.get("source"),
                "data_hash": lineage.get("data_hash"),
                **{k: metrics.get(k) for k in ("top1", "macro_f1", "balanced_accuracy")},
                "production": lineage["model_id"] == prod,
                "card": (lineage_path.parent / CARD_MD).is_file(),
            }
        )
    return sorted(rows, key=lambda r: str(r["registered_at"]))


def latest_id(root: Path) -> str:
    """The most recently registered model: what ``promote`` without a MODEL_ID means."""
    rows = list_models(root)
    if not rows:
        raise RegistryError(f"{root}: no registered model; run `astroflow registry register` first")
    return rows[-1]["model_id"]


def show(root: Path, model_id: str | None = None) -> dict[str, Any]:
    """Lineage, headline metrics, model card and promotion history of one model (default: production)."""
    root = Path(root)
    if model_id is None:
        model_id = production_id(root)
        if model_id is None:
            raise RegistryError(f"{root}: no production model; name a MODEL_ID (see `astroflow registry list`)")
    metrics, lineage = read_record(_registered(root, model_id))
    return {
        "model_id": model_id,
        "production": model_id == production_id(root),
        "metrics": {k: metrics.get(k) for k in HEADLINE_METRICS},
        "card": _card(candidate_dir(root, model_id)),
        "lineage": lineage,
        "history": [h for h in history(root) if model_id in (h.get("candidate_id"), h.get("production_id"))],
    }


def _card(directory: Path) -> dict[str, Any] | None:
    """The model card's path, its metrics with intervals and its weak classes; None for a model registered without one."""
    if not (directory / CARD_JSON).is_file():
        return None
    card = read_json(directory / CARD_JSON)
    return {
        "path": str(directory / CARD_MD),
        "metrics": card["evaluation"]["metrics"],
        "weak_classes": [w["class"] for w in card["weak_classes"]],
    }


def format_models(rows: Sequence[Mapping[str, Any]]) -> str:
    """``list_models`` rows as an aligned text table; ``*`` marks production, ``card`` whether it has a model card."""
    header = ("", "model_id", "registered_at", "source", "top1", "macro_f1", "bal_acc", "card")
    body = [
        (
            "*" if r["production"] else "",
            str(r["model_id"]),
            str(r["registered_at"] or "")[:19],
            str(r["source"] or ""),
            *(f"{v:.4f}" if finite(v) is not None else "n/a" for v in (r["top1"], r["macro_f1"], r["balanced_accuracy"])),
            "yes" if r["card"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body))


def history(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ promotion and rollback


@dataclass(frozen=True)
class _Scores:
    """Both models' values of the registry metric on one test split, and that split's class counts."""

    candidate: float | None
    production: float | None
    class_counts: Sequence[int]
    basis: str
    num_samples: int | None
    same_classes: bool = True


def promote(
    root: Path,
    model_id: str,
    cfg: Config,
    *,
    shards_dir: Path | None = None,
    force: bool = False,
    reason: str | None = None,
    by: str = "cli",
) -> Decision:
    """Apply the rule to a registered model and switch production if it wins; every call is logged.

    ``shards_dir`` holds the candidate's test split (default: the one recorded at registration); it is
    read only when production must be re-scored. ``force`` skips the rule and needs a ``reason``.
    """
    root = Path(root)
    _registered(root, model_id)
    if force and not (reason or "").strip():
        raise RegistryError("promote --force needs --reason: the history must say why the rule was overridden")
    with _registry_lock(root):
        prod_id = production_id(root)
        if force:
            decision = _forced(root, model_id, prod_id, cfg.registry.metric, f"forced by {by}: {reason}")
        else:
            scores = _scores(root, model_id, prod_id, cfg, shards_dir)
            decision = decide(
                model_id,
                scores.candidate,
                rule=Rule.from_config(cfg.registry),
                majority_value=majority_baseline(scores.class_counts, cfg.registry.metric),
                production_id=prod_id,
                production_value=scores.production,
                same_classes=scores.same_classes,
                basis=scores.basis,
                num_samples=scores.num_samples,
            )
        if decision.promote:
            _switch(root, model_id)
        _log(root, {"action": "promote", "by": by, "comment": reason, **decision.to_dict()})
    return decision


def _forced(root: Path, model_id: str, prod_id: str | None, metric: str, reason: str) -> Decision:
    """A person's decision: promoted whatever the rule says (unless it already is production)."""
    cand = finite(read_record(candidate_dir(root, model_id))[0].get(metric))
    prod = finite(read_record(candidate_dir(root, prod_id))[0].get(metric)) if prod_id else None
    if prod_id == model_id:
        return Decision(False, "the candidate already is the production model", metric, model_id, cand, prod_id, prod)
    return Decision(True, reason, metric, model_id, cand, prod_id, prod, basis="forced, not compared", forced=True)


def _scores(root: Path, model_id: str, prod_id: str | None, cfg: Config, shards_dir: Path | None) -> _Scores:
    """The registered metrics when both models were tested alike on the same galaxies; else a re-score."""
    metric = cfg.registry.metric
    cand_dir = candidate_dir(root, model_id)
    cand_metrics, cand_lineage = read_record(cand_dir)
    stored = _Scores(
        cand_metrics.get(metric), None, cand_lineage["test_class_counts"], STORED, cand_metrics.get("num_samples")
    )
    if prod_id is None or prod_id == model_id:
        return stored
    prod_dir = candidate_dir(root, prod_id)
    prod_metrics, prod_lineage = read_record(prod_dir)
    stored = replace(stored, production=prod_metrics.get(metric))
    if prod_lineage.get("class_names") != cand_lineage["class_names"]:
        return replace(stored, same_classes=False)
    same = (
        prod_lineage.get("data_hash") == cand_lineage["data_hash"]
        and bool(prod_metrics.get("tta")) == bool(cand_metrics.get("tta"))
        and _split_ids(prod_dir / SPLIT_FILE, "test") == _split_ids(cand_dir / SPLIT_FILE, "test")
    )
    return stored if same else _rescore(cfg, cand_dir, prod_dir, Path(shards_dir or cand_lineage["shards_dir"]))


def _split_ids(table: Path, split: str) -> set[str]:
    """Galaxy ids in ``split`` of a split table written by the shard stage."""
    import pyarrow.parquet as pq

    if not table.is_file():
        raise RegistryError(f"{table}: no split table; cannot tell which galaxies a model trained on (use --force)")
    columns = pq.read_table(table, columns=["id", "split"]).to_pydict()
    return {str(i) for i, s in zip(columns["id"], columns["split"]) if s == split}


def _rescore(cfg: Config, cand_dir: Path, prod_dir: Path, shards_dir: Path) -> _Scores:
    """Both models on the candidate's test split minus production's training galaxies, scored alike."""
    from pipeline.score.evaluate import score_split
    from pipeline.data.shards import load_manifest

    data_hash = read_record(cand_dir)[1]["data_hash"]
    test_ids = _split_ids(cand_dir / SPLIT_FILE, "test")
    if load_manifest(shards_dir).get("data_hash") != data_hash or _split_ids(_split_table(shards_dir), "test") != test_ids:
        raise RegistryError(
            f"{shards_dir}: not the test split {cand_dir.name} was evaluated on (data {data_hash}); "
            "pass the shards it was registered with"
        )
    excluded = _split_ids(prod_dir / SPLIT_FILE, "train")
    values = []
    for model_dir in (cand_dir, prod_dir):
        model = TrainedModel.load(model_dir / MODEL_FILE)
        preds = score_split(cfg, model, shards_dir, "test", progress=False, exclude_ids=excluded)
        names = model.class_names
        values.append(M.summarize(preds.logits, preds.labels, names, bins=cfg.calibrate.bins)[cfg.registry.metric])
    basis = (
        f"both re-scored on the candidate's test split in {shards_dir}, {len(preds.labels)} galaxies "
        "after leaving out production's training split"
    )
    counts = np.bincount(preds.labels, minlength=len(names)).tolist()
    return _Scores(values[0], values[1], counts, basis, len(preds.labels))


def rollback(root: Path, *, reason: str | None = None, by: str = "cli") -> str:
    """Put back the model that was production before the current one, as the history records it."""
    root = Path(root)
    with _registry_lock(root):
        current = production_id(root)
        if current is None:
            raise RegistryError(f"{root}: no production model to roll back")
        stack = _production_stack(history(root))
        if not stack or stack[-1] != current:
            raise RegistryError(f"{root / PRODUCTION}: points at {current}, which the history did not put there")
        if len(stack) < 2:
            raise RegistryError(f"{root}: {current} is the first production model; there is nothing to roll back to")
        previous = stack[-2]
        _registered(root, previous)
        _switch(root, previous)
        _log(
            root,
            {"action": "rollback", "by": by, "promote": True, "forced": True, "reason": reason or "rollback",
             "candidate_id": previous, "production_id": current},
        )
    return previous


def _production_stack(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Production models in the order they were installed, each rollback undoing the latest."""
    stack: list[str] = []
    for entry in entries:
        if not entry.get("promote"):
            continue
        if entry.get("action") == "rollback":
            stack.pop()
        else:
            stack.append(entry["candidate_id"])
    return stack


@contextmanager
def _registry_lock(root: Path) -> Iterator[None]:
    """Blocking ``flock``: two runs finishing together compare against the same production model."""
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


def _log(root: Path, record: Mapping[str, Any]) -> None:
    """Append one line under the lock: one ``write`` of a complete line, so readers never see half of it."""
    with open(root / HISTORY, "a") as fh:
        fh.write(json.dumps({"at": _now(), **record}, default=str) + "\n")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()

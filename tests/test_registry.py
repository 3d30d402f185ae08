"""Promotion rules, atomic production switch and lineage of ``pipeline.registry`` (no Prefect, no training)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline import registry as reg


def _fake_model(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(os.urandom(64))
    return path


def _register(root: Path, tmp_path: Path, mid: str, metrics: dict[str, float], **kw: object) -> Path:
    cal = tmp_path / f"{mid}-cal.json"
    cal.write_text('{"temperature": 1.5}')
    return reg.register_candidate(
        root, mid, _fake_model(tmp_path, mid), metrics=metrics, lineage={"config_hash": f"cfg-{mid}"}, calibration=cal, **kw
    )


@pytest.mark.parametrize(
    ("cand", "prod", "prod_id", "promote"),
    [
        ({"macro_f1": 0.5}, None, None, True),
        ({"macro_f1": 0.6}, {"macro_f1": 0.5}, "old", True),
        ({"macro_f1": 0.5}, {"macro_f1": 0.5}, "old", False),
        ({"macro_f1": 0.4}, {"macro_f1": 0.5}, "old", False),
        ({"macro_f1": float("nan")}, None, None, False),
        ({}, {"macro_f1": 0.5}, "old", False),
        ({"macro_f1": 0.1}, {"top1": 0.9}, "old", True),
    ],
)
def test_decide(cand: dict, prod: dict | None, prod_id: str | None, promote: bool) -> None:
    d = reg.decide("new", cand, prod_id, prod, "macro_f1")
    assert d.promote is promote
    assert d.metric == "macro_f1" and d.candidate_id == "new" and d.production_id == prod_id
    assert d.reason


def test_same_model_is_not_promoted_again() -> None:
    d = reg.decide("m1", {"top1": 0.9}, "m1", {"top1": 0.9}, "top1")
    assert not d.promote and "already" in d.reason


def test_first_model_is_promoted_then_only_a_better_one(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    assert reg.production_dir(root) is None
    with pytest.raises(reg.RegistryError, match="no production model"):
        reg.production_checkpoint(root)

    _register(root, tmp_path, "m1", {"macro_f1": 0.5, "top1": 0.9})
    first = reg.promote_if_better(root, "m1", "macro_f1")
    assert first.promote and reg.production_id(root) == "m1"

    _register(root, tmp_path, "m2", {"macro_f1": 0.4, "top1": 0.95})
    worse = reg.promote_if_better(root, "m2", "macro_f1")
    assert not worse.promote and reg.production_id(root) == "m1"
    assert worse.production_value == 0.5 and worse.candidate_value == 0.4

    # The configured metric decides: the same candidate wins on top1.
    assert reg.promote_if_better(root, "m2", "top1").promote
    assert reg.production_id(root) == "m2"

    prod = reg.production_dir(root)
    assert (root / reg.PRODUCTION).is_symlink()
    assert reg.production_checkpoint(root) == prod / reg.MODEL_FILE
    assert (prod / reg.MODEL_FILE).read_bytes() == (tmp_path / "m2.pt").read_bytes()
    assert (prod / reg.CALIBRATION_FILE).is_file()
    metrics, lineage = reg.read_record(prod)
    assert metrics["top1"] == 0.95
    assert lineage["model_id"] == "m2" and lineage["config_hash"] == "cfg-m2" and "registered_at" in lineage

    decisions = reg.history(root)
    assert [(h["candidate_id"], h["promote"]) for h in decisions] == [("m1", True), ("m2", False), ("m2", True)]


def test_register_is_write_once(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    first = _register(root, tmp_path, "m1", {"top1": 0.5})
    again = _register(root, tmp_path, "m1", {"top1": 0.99})
    assert first == again
    assert reg.read_record(first)[0]["top1"] == 0.5
    assert not [p for p in (root / reg.CANDIDATES).iterdir() if p.name.startswith(".")]


def test_unregistered_candidate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(reg.RegistryError, match="not a registered candidate"):
        reg.promote_if_better(tmp_path / "registry", "ghost", "top1")


def test_rollback_is_forced_and_recorded(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    _register(root, tmp_path, "m1", {"top1": 0.5})
    _register(root, tmp_path, "m2", {"top1": 0.9})
    reg.promote_if_better(root, "m1", "top1")
    reg.promote_if_better(root, "m2", "top1")
    reg.set_production(root, "m1", "m2 misbehaves on survey data")
    assert reg.production_id(root) == "m1"
    last = reg.history(root)[-1]
    assert last["forced"] and last["production_id"] == "m2" and last["candidate_id"] == "m1"


def test_plain_production_directory_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    (root / reg.PRODUCTION).mkdir(parents=True)
    with pytest.raises(reg.RegistryError, match="symlink"):
        reg.production_dir(root)


def test_concurrent_promotions_keep_the_best(tmp_path: Path) -> None:
    """Compare-and-switch runs under a lock: whatever the interleaving, the best candidate ends in production."""
    root = tmp_path / "registry"
    scores = {f"m{i}": 0.1 * i for i in range(1, 9)}
    for mid, score in scores.items():
        _register(root, tmp_path, mid, {"top1": score})
    threads = [threading.Thread(target=reg.promote_if_better, args=(root, mid, "top1")) for mid in scores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.production_id(root) == max(scores, key=scores.get)
    assert len(reg.history(root)) == len(scores)


def test_code_version_names_the_commit() -> None:
    code = reg.code_version()
    assert set(code) >= {"git_commit", "git_dirty", "torch"}
    if code["git_commit"] is not None:
        assert len(code["git_commit"]) == 40

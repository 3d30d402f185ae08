"""Stratified split, shard round trips, manifest, atomicity, and the training loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_galaxy10_h5
from pipeline.data import shards as shards_mod
from pipeline.config import load_config
from pipeline.errors import DataError
from pipeline.io import sha256_file
from pipeline.data.prepare import DATASET_FILE, prepare
from pipeline.data.shards import iter_split, load_manifest, make_dataset, shard_urls, stratified_split, write_shards


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_stratified_split_within_one_sample_of_ideal(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(10, size=1777, p=np.array([1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873]) / 17736)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    assign = stratified_split(labels, fractions, seed)
    for cls in range(10):
        n_cls = int((labels == cls).sum())
        for idx, frac in enumerate(fractions.values()):
            got = int(((labels == cls) & (assign == idx)).sum())
            assert abs(got - frac * n_cls) < 1.0, (cls, idx, got, frac * n_cls)
    for idx, frac in enumerate(fractions.values()):
        assert abs((assign == idx).sum() - frac * len(labels)) <= 10
    assert np.array_equal(assign, stratified_split(labels, fractions, seed))
    assert not np.array_equal(assign, stratified_split(labels, fractions, seed + 100))


def test_small_classes_still_fill_every_split():
    labels = np.repeat(np.arange(10), 6)
    assign = stratified_split(labels, {"train": 0.8, "val": 0.1, "test": 0.1}, 0)
    assert [(assign == i).sum() for i in range(3)] == [48, 6, 6]


def _prepared(tmp_path: Path, n: int = 60, size: int = 16, **kw) -> tuple[Path, dict]:
    src = tmp_path / "g10.h5"
    data = make_galaxy10_h5(src, n=n, size=size, **kw)
    cfg = load_config(None, ["data.source=h5", f"data.path={src}"])
    prepare(cfg, tmp_path / "prep", progress=False)
    return tmp_path / "prep" / DATASET_FILE, data


@pytest.mark.parametrize("fmt", ["png", "npy", "jpg"])
def test_round_trip_every_sample(tmp_path, fmt):
    prepared, data = _prepared(tmp_path, n=70, size=24)
    cfg = load_config(None, [f"shard.image_format={fmt}", "shard.max_samples_per_shard=16", "shard.workers=2", "data.chunk_size=9"])
    manifest = write_shards(cfg, prepared, tmp_path / "shards", progress=False)
    seen = {}
    for split in ("train", "val", "test"):
        for image, label, meta in iter_split(tmp_path / "shards", split):
            row = meta["row"]
            assert row not in seen
            seen[row] = split
            assert label == data["ans"][row] and meta["id"] == f"{row:06d}"
            assert meta["ra"] == pytest.approx(data["ra"][row]) and meta["class_name"] == manifest["class_names"][label]
            if fmt == "jpg":
                assert np.corrcoef(image.ravel(), data["images"][row].ravel())[0, 1] > 0.5
            else:
                assert image.dtype == np.uint8 and np.array_equal(image, data["images"][row])
    assert sorted(seen) == list(range(70))
    table = pq.read_table(tmp_path / "shards" / "split.parquet").to_pylist()
    assert {r["row"]: r["split"] for r in table} == seen


def test_manifest_records_shards_counts_and_hashes(tmp_path):
    prepared, data = _prepared(tmp_path)
    cfg = load_config(None, ["shard.max_samples_per_shard=10"])
    m = write_shards(cfg, prepared, tmp_path / "shards", progress=False)
    assert m == load_manifest(tmp_path / "shards")
    assert sum(s["num_samples"] for s in m["splits"].values()) == 60
    assert len(m["splits"]["train"]["shards"]) == 5
    for split in m["splits"].values():
        assert sum(split["class_counts"].values()) == split["num_samples"]
        for s in split["shards"]:
            assert sha256_file(tmp_path / "shards" / s["name"]) == s["sha256"]
    assert m["config_hash"] == cfg.section_hash("split", "shard") and len(m["data_hash"]) == 32


def test_same_seed_same_shards_other_seed_other_split(tmp_path):
    prepared, _ = _prepared(tmp_path)
    cfg = load_config(None, [])
    a = write_shards(cfg, prepared, tmp_path / "a", progress=False)
    b = write_shards(cfg, prepared, tmp_path / "b", progress=False)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]
    c = write_shards(load_config(None, ["split.seed=3"]), prepared, tmp_path / "c", progress=False)
    rows = lambda d: sorted(m["row"] for _, _, m in iter_split(tmp_path / d, "test"))  # noqa: E731
    assert rows("a") != rows("c")


def test_interrupted_shard_run_keeps_previous_set(tmp_path, monkeypatch):
    prepared, _ = _prepared(tmp_path)
    cfg = load_config(None, ["shard.workers=1", "data.chunk_size=8"])
    out = tmp_path / "shards"
    write_shards(cfg, prepared, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = shards_mod._encode_many

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shards_mod, "_encode_many", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(load_config(None, ["shard.workers=1", "data.chunk_size=8", "split.seed=9"]), prepared, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shard_refuses_failed_or_stale_validation(tmp_path):
    prepared, _ = _prepared(tmp_path)
    cfg = load_config(None, [])
    report = tmp_path / "report.json"
    with pytest.raises(DataError, match="validation report not found"):
        write_shards(cfg, prepared, tmp_path / "s", validation_report=report, progress=False)
    report.write_text(json.dumps({"success": False}))
    with pytest.raises(DataError, match="failed validation"):
        write_shards(cfg, prepared, tmp_path / "s", validation_report=report, progress=False)
    report.write_text(json.dumps({"success": True, "data_hash": "other"}))
    with pytest.raises(DataError, match="re-run `astroflow validate`"):
        write_shards(cfg, prepared, tmp_path / "s", validation_report=report, progress=False)
    assert not (tmp_path / "s").exists()


def test_loader_splits_by_worker_without_duplicates(tmp_path):
    prepared, data = _prepared(tmp_path, n=80)
    write_shards(load_config(None, ["shard.max_samples_per_shard=8"]), prepared, tmp_path / "shards", progress=False)
    urls = shard_urls(tmp_path / "shards", "train")
    ds = make_dataset(urls, shuffle_buffer=20, seed=1, transform=lambda im: torch.from_numpy(im).float().mean())
    loader = torch.utils.data.DataLoader(ds.map(lambda r: (r[0], r[1], r[2]["row"])), batch_size=None, num_workers=2)
    rows = [int(r) for _, _, r in loader]
    assert sorted(rows) == sorted(m["row"] for _, _, m in iter_split(tmp_path / "shards", "train"))
    assert len(rows) == load_manifest(tmp_path / "shards")["splits"]["train"]["num_samples"] > 0

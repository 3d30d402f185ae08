"""Stratified split, shard round trips, manifest, atomicity, and the shard reader (streams and batches)."""

from __future__ import annotations

import itertools
import json
import random
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
from pipeline.data.reader import (
    StreamSpec,
    iter_split,
    make_loader,
    plain_batches,
    slot_samples,
    stratified_batches,
)
from pipeline.data.shards import load_manifest, shard_urls, stratified_split, write_shards


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
    write_shards(cfg, prepared, tmp_path / "shards", progress=False)
    seen = {}
    for split in ("train", "val", "test"):
        for rec in iter_split(tmp_path / "shards", split):
            row = rec.row
            assert row not in seen
            seen[row] = split
            assert rec.label == data["ans"][row] and rec.id == f"{row:06d}" and rec.ra == pytest.approx(data["ra"][row])
            if fmt == "jpg":
                assert np.corrcoef(rec.image.ravel(), data["images"][row].ravel())[0, 1] > 0.5
            else:
                assert rec.image.dtype == np.uint8 and np.array_equal(rec.image, data["images"][row])
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
    rows = lambda d: sorted(r.row for r in iter_split(tmp_path / d, "test"))  # noqa: E731
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


def test_sample_is_an_image_and_one_json_of_the_record_fields(tmp_path):
    """The member format of ``docs/design.md``: the label lives in the JSON only, under its one name."""
    prepared, data = _prepared(tmp_path, n=20)
    manifest = write_shards(load_config(None, []), prepared, tmp_path / "shards", progress=False)
    spec = StreamSpec(urls=tuple(shard_urls(tmp_path / "shards", "train")), batch_size=1)
    sample, label = next(slot_samples(spec, 0, 1))
    assert {k for k in sample if not k.startswith("__")} == {"png", "json"}
    meta = json.loads(sample["json"])
    assert set(meta) == {"id", "row", "source_row", "label", "class_name", "ra", "dec", "redshift", "pxscale"}
    assert label == meta["label"] == data["ans"][meta["row"]] and meta["class_name"] == manifest["class_names"][label]
    assert manifest["format_version"] == 2


# ---------------------------------------------------------------- the reader's streams


@pytest.fixture(scope="module")
def ten_class_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 images of 10 classes at 16 px: train, val and test splits in 10-sample shards."""
    root = tmp_path_factory.mktemp("reader")
    prepared, _ = _prepared(root, n=120)
    write_shards(load_config(None, ["shard.max_samples_per_shard=10"]), prepared, root / "shards", progress=False)
    return root / "shards"


def test_ordered_pass_reads_every_sample_once_whatever_the_workers(ten_class_shards):
    urls = tuple(shard_urls(ten_class_shards, "train"))
    written = [r.row for r in iter_split(ten_class_shards, "train")]
    assert len(written) == load_manifest(ten_class_shards)["splits"]["train"]["num_samples"] > 0
    for workers in (0, 2):
        loader = make_loader(StreamSpec(urls=urls, batch_size=7), lambda im: im, workers, pin_memory=False)
        batches = list(loader)
        assert all(x.shape[1:] == (3, 16, 16) and len(ids) == len(rows) == len(y) for x, y, ids, rows in batches)
        rows = [r for *_, batch_rows in batches for r in batch_rows]
        assert sorted(rows) == sorted(written)
        if workers == 0:
            assert rows == written  # one reader: written order


def test_stratified_batches_hold_every_class() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=2000, p=[0.5, 0.3, 0.15, 0.04, 0.01])  # class 4: one in a hundred
    stream = (({"i": i}, int(y)) for i, y in enumerate(labels))
    batches = list(itertools.islice(stratified_batches(stream, 16, range(5), random.Random(0), 256), 100))
    assert all(len(b) == 16 and {y for _, y in b} == set(range(5)) for b in batches)
    # the plain batcher on the same stream misses the rare class: the property is not free
    plain = plain_batches((({"i": i}, int(y)) for i, y in enumerate(labels)), 16)
    assert any({y for _, y in b} != set(range(5)) for b in itertools.islice(plain, 100))
    # apart from the one-per-class places, samples come in stream order, not re-weighted
    counts = np.bincount([y for b in batches for _, y in b], minlength=5)
    assert counts[0] > counts[1] > counts[2]


def test_train_loader_batches_hold_every_class_and_split_by_rank(ten_class_shards) -> None:
    manifest = load_manifest(ten_class_shards)
    urls = tuple(shard_urls(ten_class_shards, "train"))
    spec = StreamSpec(urls=urls, batch_size=12, steps=20, shuffle_buffer=32, stratify=tuple(range(10)), epoch=3)
    batches = [(x, y) for x, y, _, _ in make_loader(spec, lambda im: im, workers=2, pin_memory=False)]
    assert len(batches) == 20
    for x, y in batches:
        assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8 and set(y.tolist()) == set(range(10))
    # the same spec gives the same batches; another epoch gives others
    again = [y for _, y, _, _ in make_loader(spec, lambda im: im, workers=2, pin_memory=False)]
    assert all(torch.equal(a, b) for (_, a), b in zip(batches, again))
    other = [y for _, y, _, _ in make_loader(StreamSpec(**{**spec.__dict__, "epoch": 4}), lambda im: im, 2, False)]
    assert any(not torch.equal(a, b) for (_, a), b in zip(batches, other))
    val = tuple(shard_urls(ten_class_shards, "val"))
    seen = [
        rows
        for rank in (0, 1)
        for _, _, _, rows in make_loader(StreamSpec(urls=val, batch_size=7, world_size=2, rank=rank), lambda im: torch.zeros(1), 2, False)
    ]
    rows = [r for batch in seen for r in batch]
    assert len(rows) == len(set(rows)) == manifest["splits"]["val"]["num_samples"]


def test_units_cover_every_sample_once_with_more_slots_than_shards(ten_class_shards) -> None:
    urls = tuple(shard_urls(ten_class_shards, "val"))
    keys: list[str] = []
    slots = 7  # more reader slots than the 2 val shards
    for slot in range(slots):
        keys += [s["__key__"] for s, _ in slot_samples(StreamSpec(urls=urls, batch_size=1), slot, slots)]
    assert len(urls) < slots and len(keys) == len(set(keys)) == sum(1 for _ in iter_split(ten_class_shards, "val"))

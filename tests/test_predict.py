"""The predict stage end to end: every input kind into the documented Parquet catalog, resume, idempotency,
bad inputs, calibration. Tiny real checkpoints (astroformer_pico at 32 px) on tiny generated images."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.catalog import parquet as C
from pipeline.learn.checkpoint import load_model, model_id, save_checkpoint
from pipeline.config import GALAXY10_CLASS_NAMES, Config, load_config
from pipeline.errors import CheckpointError, DataError
from pipeline.catalog.inputs import iter_chunks, open_input, plan_chunks
from pipeline.catalog.predict import finalize_run, main, plan_run, predict
from pipeline.data.prepare import write_prepared
from pipeline.data.shards import write_shards
from pipeline.data.sources.arrays import ArraySource
from pipeline.data.transforms import eval_batch_transform, eval_transform, normalization

MODEL, SIZE = "astroformer_pico", 32
REPO = Path(__file__).resolve().parents[1]
PROBS = C.prob_columns(GALAXY10_CLASS_NAMES)


def make_checkpoint(path: Path, seed: int) -> Path:
    from models.factory import create_model

    torch.manual_seed(seed)
    net = create_model(MODEL, num_classes=len(GALAXY10_CLASS_NAMES), img_size=SIZE)
    cfg = Config()
    cfg.model.name, cfg.model.img_size = MODEL, SIZE
    save_checkpoint(
        path,
        {"model": net.state_dict(), "config": cfg.to_dict(), "class_names": list(GALAXY10_CLASS_NAMES),
         "model_name": MODEL, "img_size": SIZE, "epoch": 0, "metrics": {}},
    )
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model_a") / "best.pt", seed=0)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model_b") / "best.pt", seed=1)


def config(**predict: Any) -> Config:
    cfg = load_config(None, ["predict.device=cpu", "predict.workers=0", "predict.batch_size=8", "predict.chunk_size=16"])
    for key, value in predict.items():
        setattr(cfg.predict, key, value)
    return cfg


def images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_h5(path: Path, imgs: np.ndarray, *, ids: list[str] | None = None, chunks: tuple[int, ...] | None = None) -> Path:
    n = len(imgs)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=imgs, chunks=chunks, compression="gzip" if chunks else None)
        f["ans"] = np.zeros(n, np.uint8)
        f["ra"] = np.linspace(10, 20, n)
        f["dec"] = np.where(np.arange(n) % 3 == 0, np.nan, np.linspace(-5, 5, n))
        if ids is not None:
            f.create_dataset("id", data=ids, dtype=h5py.string_dtype())
    return path


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def read_run(root: Path, run: str) -> pd.DataFrame:
    return C.read_predictions(root, run=run)


def check_catalog(root: Path, run: str) -> pd.DataFrame:
    """Every file and the dataset have exactly the documented schema; the derived columns agree with the probabilities."""
    files = sorted((root / C.PREDICTIONS / f"run={run}").glob("*.parquet"))
    assert files
    for f in files:
        assert pq.read_schema(f).equals(C.GALAXY10_SCHEMA, check_metadata=False), f
    assert C.predictions_dataset(root).schema.equals(C.with_partition(C.GALAXY10_SCHEMA), check_metadata=False)
    df = read_run(root, run)
    assert list(df.columns) == C.GALAXY10_SCHEMA.names + ["run"]
    p = df[PROBS].to_numpy(np.float64)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(df["max_prob"].to_numpy(), df[PROBS].to_numpy().max(axis=1))
    np.testing.assert_array_equal(df["pred_label"].to_numpy(), p.argmax(axis=1))
    assert (df["pred_class"] == [GALAXY10_CLASS_NAMES[i] for i in df["pred_label"]]).all()
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)
    np.testing.assert_allclose(df["entropy"].to_numpy(), entropy, atol=1e-5)
    assert df["id"].is_unique
    return df


# ------------------------------------------------------------------ input kinds


def test_h5_round_trip(tmp_path: Path, ckpt: Path) -> None:
    imgs = images(37, seed=1, size=48)  # not the model's size: resized by eval_transform
    ids = [f"gal/{i}.x" for i in range(37)]  # slashes and dots survive
    src = write_h5(tmp_path / "in.h5", imgs, ids=ids)
    out = tmp_path / "cat"
    s = predict(config(), ckpt, src, out, progress=False)
    assert (s["num_written"], s["num_errors"], s["num_chunks"], s["model_id"]) == (37, 0, 3, model_id(ckpt))
    assert "uncalibrated" in s["calibration"]
    df = check_catalog(out, s["run_id"]).set_index("id").loc[ids]
    assert (df["source_file"] == str(src)).all() and df["source_row"].tolist() == list(range(37))
    assert df["ra"].tolist() == pytest.approx(np.linspace(10, 20, 37).tolist())
    assert df["dec"].isna().tolist() == [i % 3 == 0 for i in range(37)]  # NaN in the file -> null
    assert (df["model_id"] == model_id(ckpt)).all() and not df["tta"].any()
    summary = json.loads(Path(s["summary_path"]).read_text())
    assert sum(summary["class_counts"].values()) == 37
    assert summary["class_counts"] == df["pred_class"].value_counts().reindex(GALAXY10_CLASS_NAMES, fill_value=0).to_dict()
    assert summary["low_confidence"]["count"] == int((df["max_prob"] < 0.5).sum())


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("shards")
    n = 40
    cfg = load_config(None, ["shard.workers=1", "shard.max_samples_per_shard=9", "split.train=0.5", "split.val=0.25", "split.test=0.25"])
    source = ArraySource(images(n, seed=2), np.arange(n) % 10, ids=[f"obj-{i}" for i in range(n)], ra=np.arange(n) * 1.0, dec=None)
    write_prepared(source, root / "dataset.h5", cfg.data, progress=False)
    write_shards(cfg, root / "dataset.h5", root / "shards", progress=False)
    return root / "shards", pd.read_parquet(root / "shards" / "split.parquet")


def test_shards_round_trip_and_default_test_split(tmp_path: Path, ckpt: Path, shards_dir: tuple[Path, pd.DataFrame]) -> None:
    shards, split = shards_dir
    out = tmp_path / "cat"
    s = predict(config(workers=2), ckpt, None, out, shards_dir=shards, progress=False)
    df = check_catalog(out, s["run_id"])
    assert sorted(df["id"]) == sorted(split.loc[split["split"] == "test", "id"])
    assert df["ra"].tolist() == [float(i.split("-")[1]) for i in df["id"]] and df["dec"].isna().all()
    assert all(Path(f).suffix == ".tar" for f in df["source_file"])
    s_all = predict(config(), ckpt, shards, out, progress=False)  # the whole directory: every split
    assert s_all["run_id"] != s["run_id"] and s_all["num_written"] == 40
    assert sorted(check_catalog(out, s_all["run_id"])["id"]) == sorted(split["id"])


def test_folder_round_trip_with_and_without_csv(tmp_path: Path, ckpt: Path) -> None:
    imgs = images(12, seed=3)
    folder = tmp_path / "cutouts"
    names = [f"{'sub/' if i % 2 else ''}g{i:02d}.{'png' if i % 3 else 'jpg'}" for i in range(12)]
    for name, img in zip(names, imgs):
        write_png(folder / name, img)
    (folder / "notes.txt").write_text("not an image")
    s = predict(config(), ckpt, folder, tmp_path / "cat", progress=False)
    df = check_catalog(tmp_path / "cat", s["run_id"])
    assert sorted(df["id"]) == sorted(n.rsplit(".", 1)[0] for n in names)
    assert df["ra"].isna().all() and s["num_written"] == 12

    pd.DataFrame({"id": [f"J{i}" for i in range(12)], "path": names, "ra": np.arange(12.0), "dec": [None] * 11 + [1.5]}).to_csv(
        folder / "catalog.csv", index=False
    )
    s2 = predict(config(), ckpt, folder, tmp_path / "cat", progress=False)
    assert s2["run_id"] != s["run_id"]
    df2 = check_catalog(tmp_path / "cat", s2["run_id"]).set_index("id").loc[[f"J{i}" for i in range(12)]]
    assert df2["ra"].tolist() == list(range(12)) and df2["dec"].isna().sum() == 11
    assert df2["source_file"].tolist() == [str((folder / n).resolve()) for n in names]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_zoobot_catalog_round_trip(tmp_path: Path, ckpt: Path, fmt: str) -> None:
    imgs = images(10, seed=4)
    locs = []
    for i, img in enumerate(imgs):
        p = tmp_path / "png" / f"{i}.png"
        write_png(p, img)
        locs.append(str(p) if i % 2 else f"png/{i}.png")  # absolute, or relative to the catalog
    table = pd.DataFrame({"id_str": [f"{1000 + i}" for i in range(10)], "file_loc": locs, "ra": np.arange(10.0), "dec": -np.arange(10.0)})
    cat = tmp_path / f"zoobot.{fmt}"
    table.to_csv(cat, index=False) if fmt == "csv" else table.to_parquet(cat)
    s = predict(config(), ckpt, cat, tmp_path / "out", progress=False)
    df = check_catalog(tmp_path / "out", s["run_id"]).set_index("id")
    assert sorted(df.index) == sorted(table["id_str"])  # numeric-looking ids stay strings
    assert df.loc["1003", "dec"] == -3.0 and df.loc["1004", "source_row"] == 4


def test_zoobot_catalog_needs_its_columns(tmp_path: Path, ckpt: Path) -> None:
    pd.DataFrame({"id": ["a"], "path": ["a.png"]}).to_csv(tmp_path / "cat.csv", index=False)
    with pytest.raises(DataError, match="'id_str'.*'file_loc'"):
        predict(config(), ckpt, tmp_path / "cat.csv", tmp_path / "out", progress=False)


def test_iter_chunks_gives_uniform_records(tmp_path: Path) -> None:
    for i, img in enumerate(images(5, seed=16)):
        write_png(tmp_path / f"a{i}.png", img)
    (tmp_path / "a9.png").write_bytes(b"\x89PNG broken")
    chunks = list(iter_chunks(open_input(tmp_path), 4))
    assert [c.index for c in chunks] == [0, 1] and [len(c.records) for c in chunks] == [4, 2]
    records = [r for c in chunks for r in c.records]
    assert [r.id for r in records] == [f"a{i}" for i in (0, 1, 2, 3, 4, 9)]
    assert [r.source_row for r in records] == list(range(6))
    assert all(r.image.shape == (SIZE, SIZE, 3) for r in records[:5]) and records[5].image is None
    assert chunks[1].errors == [records[5]] and "cannot identify" in records[5].error


def test_chunk_ids_follow_the_input_identity(tmp_path: Path) -> None:
    src = write_h5(tmp_path / "in.h5", images(20, seed=5))
    first = [c.chunk_id for c in plan_chunks(open_input(src), 8)]
    assert first == [c.chunk_id for c in plan_chunks(open_input(src), 8)] and len(first) == 3
    assert [c.index for c in plan_chunks(open_input(src), 8, done={0, 2})] == [1]
    whole = [(c.index, c.chunk_id, c.items) for c in plan_chunks(open_input(src), 8)]
    assert [(c.index, c.chunk_id, c.items) for c in plan_chunks(open_input(src), 8, first=1)] == whole[1:]
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert set(first).isdisjoint(c.chunk_id for c in plan_chunks(open_input(src), 8))


# ------------------------------------------------------------------ resume and idempotency


def _predict_args(src: Path, out: Path, chunk: int) -> list[str]:
    sets = ["predict.device=cpu", "predict.workers=1", "predict.threads=1", "predict.batch_size=8", f"predict.chunk_size={chunk}"]
    args = [sys.executable, "-m", "pipeline.catalog.predict", "--checkpoint", "CKPT", "--input", str(src), "--output", str(out), "-q"]
    return args + [a for s in sets for a in ("--set", s)]


def _sigkill_after_a_commit(args: list[str], out: Path) -> int:
    """Start ``predict`` in a subprocess, SIGKILL it once a chunk is committed; the committed chunk count."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while not list(out.glob("runs/*/chunks/*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no chunk committed in 90 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return len(list(out.glob("runs/*/chunks/*.json")))


def test_kill_and_restart_gives_every_id_once(tmp_path: Path, ckpt: Path) -> None:
    n, chunk = 320, 16
    src = write_h5(tmp_path / "in.h5", images(n, seed=6), ids=[f"k{i}" for i in range(n)])
    out = tmp_path / "cat"
    args = [str(ckpt) if a == "CKPT" else a for a in _predict_args(src, out, chunk)]
    committed = _sigkill_after_a_commit(args, out)
    assert 1 <= committed < n // chunk, "the kill must land mid-run"
    assert not list(out.glob("runs/*/complete.json"))
    assert not list(out.glob("predictions/*/*.parquet"))  # an unfinished run's rows are not visible

    s = predict(config(chunk_size=chunk), ckpt, src, out, progress=False)
    assert s["num_skipped_chunks"] == committed and s["num_chunks"] == n // chunk
    assert s["num_written"] == n - committed * chunk and s["num_predicted"] == n
    df = check_catalog(out, s["run_id"])
    assert sorted(df["id"]) == sorted(f"k{i}" for i in range(n))  # each id exactly once (check_catalog: unique)
    assert not list(out.rglob(".*.tmp"))


def test_an_abandoned_killed_run_leaves_no_rows_beside_the_next_one(tmp_path: Path, ckpt: Path) -> None:
    """kill -9 mid-run, touch the input (a new run id), predict again: readers see each id once, not the dead run's rows too."""
    n, chunk = 160, 16
    src = write_h5(tmp_path / "survey.h5", images(n, seed=22), ids=[f"s{i}" for i in range(n)])
    out = tmp_path / "cat"
    args = [str(ckpt) if a == "CKPT" else a for a in _predict_args(src, out, chunk)]
    assert 1 <= _sigkill_after_a_commit(args, out) < n // chunk
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # touch: a new input identity, a new run
    assert predict(config(chunk_size=chunk), ckpt, src, out, progress=False)["num_written"] == n
    for df in (pd.read_parquet(out / C.PREDICTIONS), pq.read_table(out / C.PREDICTIONS).to_pandas(), C.read_predictions(out)):
        assert len(df) == n and sorted(df["id"]) == sorted(f"s{i}" for i in range(n))
    assert [r["complete"] is not None for r in C.Catalog(out).runs()] == [False, True]


def test_rerun_does_nothing_and_a_new_model_reclassifies(tmp_path: Path, ckpt: Path, ckpt_b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_h5(tmp_path / "in.h5", images(30, seed=7))
    out = tmp_path / "cat"
    s1 = predict(config(), ckpt, src, out, progress=False)
    parts = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    capsys.readouterr()
    s2 = predict(config(chunk_size=5), ckpt, src, out, progress=False)  # another chunk size resumes the same run
    assert s2["run_id"] == s1["run_id"] and s2["status"] == "up_to_date"
    assert (s2["num_written"], s2["num_skipped_chunks"], s2["num_predicted"]) == (0, s1["num_chunks"], 30)
    assert "nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == parts

    s3 = predict(config(), ckpt_b, src, out, progress=False)
    assert s3["model_id"] != s1["model_id"] and s3["run_id"] != s1["run_id"] and s3["num_written"] == 30
    both = C.read_predictions(out)
    assert both.groupby("run", observed=True)["id"].agg(lambda x: x.is_unique and len(x) == 30).all()
    assert set(both["model_id"]) == {s1["model_id"], s3["model_id"]}
    assert [r["run_id"] for r in C.Catalog(out).runs()] == [s1["run_id"], s3["run_id"]]


# ------------------------------------------------------------------ fan-out: chunks of one run


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def test_disjoint_chunk_calls_then_finalize_equal_one_whole_run(tmp_path: Path, ckpt: Path) -> None:
    n = 70  # 5 chunks of 16, the last one short
    src = write_h5(tmp_path / "in.h5", images(n, seed=17), ids=[f"c{i}" for i in range(n)])
    whole = predict(config(), ckpt, src, tmp_path / "whole", progress=False)

    out = tmp_path / "fan"
    plan = plan_run(config(), ckpt, src, out)
    assert (plan.run_id, plan.num_chunks, plan.pending, plan.complete) == (whole["run_id"], 5, (0, 1, 2, 3, 4), False)
    assert not list(out.glob("predictions/*/*.parquet"))  # planning runs no model
    a = predict(config(), ckpt, src, out, chunks=[3, 0, 3], progress=False)
    assert (a["chunks"], a["num_new_chunks"], a["num_written"], a["status"]) == ([0, 3], 2, 32, "partial")
    assert not (out / "runs" / plan.run_id / "complete.json").exists() and not (out / "runs" / plan.run_id / "summary.json").exists()
    assert plan_run(config(), ckpt, src, out).pending == (1, 2, 4)
    with pytest.raises(DataError, match=r"3 of 5 chunk\(s\) not committed \(1, 2, 4\)"):
        finalize_run(config(), ckpt, src, out, chunk_results=[a])
    b = predict(config(), ckpt, src, out, chunks=[1, 2, 4], progress=False)
    assert (b["num_new_chunks"], b["num_written"]) == (3, n - 32)

    s = finalize_run(config(), ckpt, src, out, chunk_results=[a, b])
    assert (s["status"], s["num_chunks"], s["num_written"], s["num_skipped_chunks"], s["num_predicted"]) == ("complete", 5, n, 0, n)
    assert s["class_counts"] == whole["class_counts"] and (out / "runs" / s["run_id"] / "complete.json").is_file()
    assert json.loads(Path(s["summary_path"]).read_text())["num_predicted"] == n
    fanned = check_catalog(out, s["run_id"]).set_index("id").sort_index()  # unique ids
    one = check_catalog(tmp_path / "whole", whole["run_id"]).set_index("id").sort_index()
    assert list(fanned.index) == sorted(f"c{i}" for i in range(n))
    pd.testing.assert_frame_equal(fanned.drop(columns=["run_ts"]), one.drop(columns=["run_ts"]))
    assert fanned["run_ts"].nunique() == 1  # every chunk carries the run's one start time

    again = predict(config(), ckpt, src, out, progress=False)  # the whole-run entry point sees a finished run
    assert again["status"] == "up_to_date" and again["num_written"] == 0
    assert plan_run(config(), ckpt, src, out).complete is True


def test_rerunning_a_committed_chunk_writes_nothing(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_h5(tmp_path / "in.h5", images(40, seed=18))
    out = tmp_path / "cat"
    first = predict(config(), ckpt, src, out, chunks=[1], progress=False)
    assert first["num_written"] == 16
    files = _files(out)
    capsys.readouterr()
    again = predict(config(), ckpt, src, out, chunks=[1], progress=False)
    assert (again["status"], again["num_written"], again["num_new_chunks"], again["num_skipped_chunks"]) == ("up_to_date", 0, 0, 1)
    assert "nothing to do" in capsys.readouterr().err
    assert _files(out) == files  # not a byte rewritten, not even run.json
    with pytest.raises(DataError, match=r"no chunk\(s\) 7"):
        predict(config(), ckpt, src, out, chunks=[7], progress=False)


def test_a_commit_another_worker_made_first_is_kept(tmp_path: Path, ckpt: Path) -> None:
    """Two workers given the same chunk (a retry racing the original): the first commit stands, the second writes nothing."""
    src = write_h5(tmp_path / "in.h5", images(20, seed=19))
    out = tmp_path / "cat"
    plan = plan_run(config(), ckpt, src, out)
    catalog = C.Catalog(out)
    meta = C.Run(catalog, plan.run_id).meta
    with catalog.join_run(plan.run_id, meta) as late:  # joined before the other worker committed
        predict(config(), ckpt, src, out, chunks=[0], progress=False)
        record = (out / "runs" / plan.run_id / "chunks" / "000000.json").read_text()
        empty = C.prediction_schema(GALAXY10_CLASS_NAMES).empty_table()
        chunk_id = json.loads(record)["chunk_id"]
        assert late.commit(0, chunk_id, empty, C.ERROR_SCHEMA.empty_table(), {}) is None
    assert (out / "runs" / plan.run_id / "chunks" / "000000.json").read_text() == record
    assert pq.read_table(out / "runs" / plan.run_id / C.PREDICTIONS).num_rows == 16  # staged until the run completes


def test_a_whole_run_writer_makes_workers_wait_not_fail(tmp_path: Path, ckpt: Path) -> None:
    src = write_h5(tmp_path / "in.h5", images(20, seed=20))
    out = tmp_path / "cat"
    plan = plan_run(config(), ckpt, src, out)
    catalog = C.Catalog(out)
    meta = C.Run(catalog, plan.run_id).meta
    results: list[Any] = []

    def worker() -> None:
        try:
            results.append(predict(config(), ckpt, src, out, chunks=[1], progress=False))
        except Exception as exc:  # the assertion below reports it
            results.append(exc)

    with catalog.open_run(plan.run_id, meta):  # a whole-run writer holds the run ...
        with pytest.raises(DataError, match="being written"):
            with catalog.open_run(plan.run_id, meta):  # ... so a second one fails at once, as before
                pass
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(3)
        assert thread.is_alive() and not results  # ... while a worker of the run waits for it
    thread.join(60)
    assert [r["num_written"] if isinstance(r, dict) else r for r in results] == [4]


def test_worker_processes_of_one_run_commit_disjoint_chunks_concurrently(tmp_path: Path, ckpt: Path) -> None:
    n = 96
    src = write_h5(tmp_path / "in.h5", images(n, seed=21), ids=[f"p{i}" for i in range(n)])
    out = tmp_path / "cat"
    plan = plan_run(config(), ckpt, src, out)
    sets = ["predict.device=cpu", "predict.workers=0", "predict.threads=1", "predict.batch_size=8", "predict.chunk_size=16"]
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom pipeline.config import load_config\nfrom pipeline.catalog.predict import predict\n"
        "ckpt, src, out, chunks, *sets = sys.argv[1:]\n"
        "predict(load_config(None, sets), Path(ckpt), Path(src), Path(out), chunks=[int(c) for c in chunks.split(',')], progress=False)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, str(script), str(ckpt), str(src), str(out), chunks, *sets], cwd=REPO, stderr=subprocess.PIPE)
        for chunks in ("0,2,4", "1,3,5")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]
    s = finalize_run(config(), ckpt, src, out)
    assert (s["num_chunks"], s["num_predicted"], s["status"]) == (plan.num_chunks, n, "complete")
    assert sorted(check_catalog(out, s["run_id"])["id"]) == sorted(f"p{i}" for i in range(n))
    assert not list(out.rglob(".*.tmp"))


# ------------------------------------------------------------------ bad input


def test_bad_images_go_to_the_errors_table(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pile"
    good = images(9, seed=8)
    for i, img in enumerate(good):
        write_png(folder / f"ok{i}.png", img)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 20)
    buf = io.BytesIO()
    Image.fromarray(images(1, seed=9, size=64)[0]).save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    write_png(folder / "gray.png", images(1, seed=10)[0][..., 0])
    Image.fromarray(np.zeros((SIZE, SIZE, 4), np.uint8)).save(folder / "rgba.png")
    write_png(folder / "wide.png", np.zeros((SIZE, 2 * SIZE, 3), np.uint8))
    bad = {"corrupt", "truncated", "rgba", "wide"}  # gray is converted by the pixel rule (docs/pixels.md), as in training

    out = tmp_path / "cat"
    rc = main(["--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out), "-q",
               "--set", "predict.workers=2", "--set", "predict.chunk_size=4", "--set", "predict.batch_size=3", "--set", "predict.device=cpu"])
    assert rc == 3
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["num_errors"] == len(bad) and summary["num_predicted"] == 10
    assert f"{len(bad)} input(s) could not be classified" in captured.err
    errors = C.read_errors(out).set_index("id")
    assert set(errors.index) == bad
    assert "truncated" in errors.loc["truncated", "reason"]
    assert "mode RGBA has transparent pixels" in errors.loc["rgba", "reason"]
    assert "square" in errors.loc["wide", "reason"]
    assert list(C.errors_dataset(out).schema.names) == C.ERROR_SCHEMA.names + ["run"]
    assert sorted(check_catalog(out, summary["run_id"])["id"]) == ["gray", *(f"ok{i}" for i in range(9))]


def test_streams_give_the_rows_and_probabilities_of_one_stream(tmp_path: Path, ckpt: Path) -> None:
    folder = tmp_path / "pile"
    for i, img in enumerate(images(13, seed=21)):
        write_png(folder / f"a{i:02d}.png", img)
    for i, img in enumerate(images(6, seed=22, size=48)):  # another size in the same batches
        write_png(folder / f"b{i:02d}.png", img)
    (folder / "c_corrupt.png").write_bytes(b"\x89PNG broken" * 10)
    runs = {}
    for streams in (1, 3):
        s = predict(config(streams=streams, threads=3), ckpt, folder, tmp_path / f"cat{streams}", progress=False)
        assert (s["streams"], s["num_written"], s["num_errors"]) == (streams, 19, 1)
        runs[streams] = check_catalog(tmp_path / f"cat{streams}", s["run_id"]).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(runs[1].drop(columns=["run_ts"]), runs[3].drop(columns=["run_ts"]))


def test_batch_transform_equals_the_per_image_transform() -> None:
    batch = [images(1, seed=i, size=size)[0] for i, size in enumerate((SIZE, 48, SIZE, 2 * SIZE, 48))]
    for input_range in ("imagenet", "minus_one_one"):
        one = eval_transform(SIZE, input_range)
        together = eval_batch_transform(SIZE, input_range)(batch)
        assert together.shape == (len(batch), 3, SIZE, SIZE)
        for img, row in zip(batch, together):
            assert torch.equal(row, one(img))
        assert torch.equal(eval_batch_transform(SIZE, input_range)(batch[:1] * 3)[2], one(batch[0]))
        mean, std = (np.array(v, np.float32)[:, None, None] for v in normalization(input_range))
        reference = (batch[0].transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std
        np.testing.assert_allclose(together[0].numpy(), reference, rtol=0, atol=1e-6)
        assert together.is_contiguous()  # a channels-last batch makes every later op strided (and onnx copies it)


def test_corrupt_and_truncated_hdf5_rows(tmp_path: Path, ckpt: Path) -> None:
    n = 40
    src = write_h5(tmp_path / "chunked.h5", images(n, seed=11), chunks=(8, SIZE, SIZE, 3))
    with h5py.File(src, "r") as f:
        info = f["images"].id.get_chunk_info(2)  # rows 16..23
    with open(src, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\x00garbage" * 8)
    s = predict(config(workers=2), ckpt, src, tmp_path / "cat", progress=False)
    errors = C.read_errors(tmp_path / "cat", run=s["run_id"])
    assert sorted(errors["source_row"]) == list(range(16, 24)) and s["num_errors"] == 8
    assert errors["reason"].str.contains("unreadable HDF5 row").all()
    assert sorted(check_catalog(tmp_path / "cat", s["run_id"])["source_row"]) == [r for r in range(n) if not 16 <= r < 24]

    plain = write_h5(tmp_path / "plain.h5", images(n, seed=12))
    with h5py.File(plain, "r") as f:
        offset, row_bytes = f["images"].id.get_offset(), SIZE * SIZE * 3
    cut = offset + 30 * row_bytes + 100  # rows 30.. lose their bytes (and the coordinates written after them)
    os.truncate(plain, cut)
    s2 = predict(config(), ckpt, plain, tmp_path / "cat2", progress=False)
    errors = C.read_errors(tmp_path / "cat2")
    assert sorted(errors["source_row"]) == list(range(30, n))
    assert errors["reason"].str.contains("truncated HDF5").all()
    kept = check_catalog(tmp_path / "cat2", s2["run_id"])
    assert sorted(kept["source_row"]) == list(range(30)) and s2["num_errors"] == n - 30


def test_truncated_shard(tmp_path: Path, ckpt: Path, shards_dir: tuple[Path, pd.DataFrame]) -> None:
    shards, _ = shards_dir
    tar = sorted(shards.glob("train-*.tar"))[0]
    copy = tmp_path / "one" / tar.name
    copy.parent.mkdir()
    shutil.copy(tar, copy)
    os.truncate(copy, copy.stat().st_size * 2 // 3 // 512 * 512 + 100)  # mid-block: inside a header or a member
    s = predict(config(), ckpt, copy.parent, tmp_path / "cat", progress=False)
    assert s["num_errors"] >= 1 and s["num_predicted"] >= 1 and s["num_predicted"] + s["num_errors"] <= 10
    assert C.read_errors(tmp_path / "cat")["reason"].str.contains("truncated|unreadable shard").all()


def test_out_of_range_coordinates_become_null_and_are_counted(tmp_path: Path, ckpt: Path) -> None:
    n = 20
    src = write_h5(tmp_path / "in.h5", images(n, seed=23), ids=[f"o{i}" for i in range(n)])
    with h5py.File(src, "a") as f:  # rows 1, 2, 5: ra 360 and -0.5, dec -90.5; row 3 (dec NaN) and the edges stay valid
        f["ra"][1], f["ra"][2], f["dec"][5], f["ra"][4], f["dec"][7] = 360.0, -0.5, -90.5, 0.0, 90.0
    s = predict(config(chunk_size=8), ckpt, src, tmp_path / "cat", progress=False)
    assert (s["num_predicted"], s["num_errors"], s["num_coords_out_of_range"]) == (n, 0, 3)  # the run goes on
    df = C.read_predictions(tmp_path / "cat").set_index("id").loc[[f"o{i}" for i in range(8)]]
    assert df["ra"].isna().tolist() == [False, True, True, False, False, False, False, False]
    assert df["dec"].isna().tolist() == [True, False, False, True, False, True, True, False]  # rows 0, 3, 6: NaN in the file
    assert (df.loc["o4", "ra"], df.loc["o7", "dec"]) == (0.0, 90.0)


def test_unusable_input_is_an_error_not_a_crash(tmp_path: Path, ckpt: Path) -> None:
    with h5py.File(tmp_path / "gray.h5", "w") as f:
        f["images"] = np.zeros((4, SIZE, SIZE), np.uint8)
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        predict(config(), ckpt, tmp_path / "gray.h5", tmp_path / "cat", progress=False)
    assert main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "gray.h5"), "--output", str(tmp_path / "cat"), "-q"]) == 2


# ------------------------------------------------------------------ calibration and TTA


def test_temperature_changes_probabilities_not_classes(tmp_path: Path, ckpt: Path) -> None:
    imgs = images(20, seed=13)
    src = write_h5(tmp_path / "in.h5", imgs, ids=[f"t{i}" for i in range(20)])
    out = tmp_path / "cat"
    raw = predict(config(), ckpt, src, out, progress=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(ckpt, model_dir / "best.pt")
    t = 2.5
    (model_dir / "calibration.json").write_text(json.dumps({"temperature": t, "model_id": model_id(ckpt), "tta": False}))
    cal = predict(config(), model_dir / "best.pt", src, out, progress=False)  # picked up beside the checkpoint
    assert cal["temperature"] == t and cal["calibration"].endswith("calibration.json") and cal["run_id"] != raw["run_id"]
    a = check_catalog(out, raw["run_id"]).set_index("id").sort_index()
    b = check_catalog(out, cal["run_id"]).set_index("id").sort_index()
    assert (a["pred_label"] == b["pred_label"]).all() and (b["temperature"] == t).all()
    assert not np.allclose(a[PROBS].to_numpy(), b[PROBS].to_numpy(), atol=1e-4)
    p = a[PROBS].to_numpy(np.float64) ** (1 / t)  # softmax(z / T) == normalised softmax(z) ** (1 / T)
    np.testing.assert_allclose(b[PROBS].to_numpy(), p / p.sum(axis=1, keepdims=True), atol=2e-5)
    assert (b["entropy"] > a["entropy"]).all() and (b["max_prob"] < a["max_prob"]).all()

    model, model_cfg, _ = load_model(ckpt)
    tf = eval_transform(SIZE, model_cfg.train.input_range)
    with torch.inference_mode():
        logits = model(torch.stack([tf(img) for img in imgs])).double()
    expected = torch.softmax(logits / t, dim=1).numpy()
    np.testing.assert_allclose(b.loc[[f"t{i}" for i in range(20)], PROBS].to_numpy(), expected, atol=1e-4)

    (model_dir / "calibration.json").write_text(json.dumps({"temperature": t, "model_id": "other-model", "tta": False}))
    with pytest.raises(CheckpointError, match="other-model"):
        predict(config(), model_dir / "best.pt", src, out, progress=False)


def test_tta_is_recorded_and_is_a_new_run(tmp_path: Path, ckpt: Path) -> None:
    imgs = images(8, seed=14)
    src = write_h5(tmp_path / "in.h5", imgs)
    plain = predict(config(), ckpt, src, tmp_path / "cat", progress=False)
    tta = predict(config(tta=True), ckpt, src, tmp_path / "cat", progress=False)
    assert tta["run_id"] != plain["run_id"] and tta["tta"] is True
    df = check_catalog(tmp_path / "cat", tta["run_id"]).sort_values("source_row")
    assert df["tta"].all()
    p_plain = check_catalog(tmp_path / "cat", plain["run_id"]).sort_values("source_row")[PROBS].to_numpy()
    assert not np.allclose(df[PROBS].to_numpy(), p_plain, atol=1e-6)
    # the 8 views of a rotated image are the same 8 views: TTA predictions are rotation invariant
    rotated = write_h5(tmp_path / "rot.h5", np.rot90(imgs, k=1, axes=(1, 2)).copy())
    again = predict(config(tta=True), ckpt, rotated, tmp_path / "cat", progress=False)
    r = check_catalog(tmp_path / "cat", again["run_id"]).sort_values("source_row")
    np.testing.assert_allclose(r[PROBS].to_numpy(), df[PROBS].to_numpy(), atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(tmp_path: Path, ckpt: Path) -> None:
    src = write_h5(tmp_path / "in.h5", images(8, seed=15))
    fp32 = predict(config(), ckpt, src, tmp_path / "a", progress=False)
    bf16 = predict(config(amp="bf16"), ckpt, src, tmp_path / "b", progress=False)
    a = check_catalog(tmp_path / "a", fp32["run_id"]).sort_values("source_row")[PROBS].to_numpy()
    b = check_catalog(tmp_path / "b", bf16["run_id"]).sort_values("source_row")[PROBS].to_numpy()
    np.testing.assert_allclose(b, a, atol=2e-2)


def test_one_run_reads_the_checkpoint_once(tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model id, network, config and calibration check all come from one read, with either backend."""
    loads: list[Any] = []
    opens: list[Path] = []
    real_load, real_open = torch.load, Path.open

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[0])
        return real_load(*args, **kwargs)

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.resolve() == ckpt.resolve():
            opens.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(Path, "open", counting_open)
    src = write_h5(tmp_path / "in.h5", images(10, seed=23))
    for backend in ("torch", "onnx"):  # onnx: no export beside the checkpoint, so one is made from the loaded model
        loads.clear()
        opens.clear()
        s = predict(config(backend=backend), ckpt, src, tmp_path / backend, progress=False)
        assert s["num_written"] == 10 and (len(loads), len(opens)) == (1, 1), backend


def test_a_calibration_file_must_name_the_model(tmp_path: Path, ckpt: Path) -> None:
    src = write_h5(tmp_path / "in.h5", images(4, seed=24))
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"temperature": 2.0, "tta": False}))
    with pytest.raises(CheckpointError, match="calibration is for model None"):
        predict(config(), ckpt, src, tmp_path / "cat", calibration=cal, progress=False)
    assert not (tmp_path / "cat").exists()

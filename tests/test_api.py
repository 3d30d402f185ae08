"""The Python API (``pipeline.api``): the same rows as ``astroflow predict`` on the same inputs; arrays, files
and a catalog DataFrame end to end; models by path, registry name or id with their calibration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.api import ARRAY_SOURCE, load_model, train
from pipeline.catalog import parquet as C
from pipeline.catalog.predict import predict
from pipeline.config import load_config
from pipeline.errors import DataError, WouldOverwrite
from conftest import install_production_model
from test_predict import images, make_checkpoint, write_h5, write_png

REPO = Path(__file__).resolve().parents[1]
VARYING = ["run_ts"]  # the time of the call: the one column that differs between two classifications

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("api-model") / "best.pt", seed=0)


def by_id(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in [*VARYING, C.PARTITION] if c in df.columns]).set_index("id").sort_index()


@pytest.mark.slow
def test_api_predictions_equal_the_cli_predict_output(tmp_path: Path, ckpt: Path) -> None:
    n = 26
    src = write_h5(tmp_path / "in.h5", images(n, seed=3, size=40), ids=[f"g{i}" for i in range(n)])
    out = tmp_path / "cat"
    cmd = [sys.executable, "-m", "pipeline.cli", "predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out), "-q"]
    cmd += ["--set", "predict.device=cpu", "--set", "predict.workers=0", "--set", "predict.batch_size=8", "--set", "predict.chunk_size=16"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = C.read_predictions(out)

    clf = load_model(ckpt, batch_size=5)  # another batch size: the rows do not depend on it (up to float rounding)
    api = clf.predict_input(src)
    assert list(api.columns) == C.GALAXY10_SCHEMA.names  # the documented columns, without the run partition
    pd.testing.assert_frame_equal(by_id(api), by_id(cli), check_categorical=False)
    assert api["run_ts"].nunique() == 1 and str(api["run_ts"].dtype) == "datetime64[us, UTC]"


def test_arrays_end_to_end_with_bad_images_and_coordinates(tmp_path: Path, ckpt: Path) -> None:
    imgs = images(6, seed=4)
    src = write_h5(tmp_path / "in.h5", imgs)
    clf = load_model(ckpt)
    ra = [10.0, 400.0, None, 1.0, 2.0, 3.0]
    dec = [0.0, 0.0, 0.0, -95.0, np.nan, 5.0]
    with pytest.warns(UserWarning, match="1 image"):
        df = clf.predict([*imgs, imgs[0][:, :20]], ids=[f"x{i}" for i in range(7)], ra=[*ra, 0.0], dec=[*dec, 0.0])
    assert list(df["id"]) == [f"x{i}" for i in range(6)] and (df["source_file"] == ARRAY_SOURCE).all()
    assert df["ra"].isna().tolist() == [False, True, True, False, False, False]
    assert df["dec"].isna().tolist() == [False, False, False, True, True, False]
    assert df.attrs["num_coords_out_of_range"] == 2
    (err,) = df.attrs["errors"].itertuples()
    assert err.id == "x6" and "square" in err.reason
    from_file = clf.predict_input(src)
    probs = C.prob_columns(clf.class_names)
    np.testing.assert_array_equal(df[probs].to_numpy(), from_file[probs].to_numpy())  # same pixels, same scores
    one = clf.predict(imgs[2])
    np.testing.assert_allclose(one[probs].to_numpy(), df[probs].to_numpy()[2:3], rtol=1e-5)  # a batch of 1: float rounding only


def test_a_catalog_dataframe_and_files_end_to_end(tmp_path: Path, ckpt: Path) -> None:
    folder = tmp_path / "pile"
    imgs = images(7, seed=5)
    for i, img in enumerate(imgs):
        write_png(folder / f"g{i}.png", img)
    catalog = pd.DataFrame({"id_str": [f"g{i}" for i in range(7)], "file_loc": [f"g{i}.png" for i in range(7)], "ra": np.arange(7.0), "dec": np.zeros(7)})
    catalog.loc[3, "file_loc"] = "missing.png"
    (tmp_path / "zoo.csv").write_text(catalog.assign(file_loc=[str(folder / f) for f in catalog["file_loc"]]).to_csv(index=False))
    cfg = load_config(None, ["predict.device=cpu", "predict.workers=0", "predict.batch_size=8"])
    summary = predict(cfg, ckpt, tmp_path / "zoo.csv", tmp_path / "cat", progress=False)  # what `astroflow predict` runs

    clf = load_model(ckpt)
    with pytest.warns(UserWarning):
        df = clf.predict_catalog(catalog, base_dir=folder)
    pd.testing.assert_frame_equal(by_id(df), by_id(C.read_predictions(tmp_path / "cat")), check_categorical=False)
    assert summary["num_errors"] == 1 and list(df.attrs["errors"]["id"]) == ["g3"]
    files = clf.predict_files([folder / "g0.png", folder / "g1.png"])
    assert list(files["id"]) == ["g0", "g1"]
    np.testing.assert_allclose(files["max_prob"].to_numpy(), df["max_prob"].to_numpy()[:2], rtol=1e-5)
    with pytest.raises(DataError, match="file_loc"):
        clf.predict_catalog(catalog.drop(columns=["file_loc"]))


def test_load_model_by_registry_name_or_id_with_its_calibration(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    mid = install_production_model(root)
    (root / "candidates" / mid / "calibration.json").write_text(json.dumps({"temperature": 2.5, "model_id": mid, "tta": False}))
    clf = load_model("production", registry=root)
    assert (clf.model_id, clf.temperature) == (mid, 2.5)
    assert load_model(mid, registry=root, tta=False).temperature == 2.5
    alone = tmp_path / "alone" / "model.pt"  # the same checkpoint without a calibration file beside it
    alone.parent.mkdir()
    shutil.copy(root / "candidates" / mid / "model.pt", alone)
    uncalibrated = load_model(alone)
    assert (uncalibrated.model_id, uncalibrated.temperature) == (mid, 1.0) and "uncalibrated" in uncalibrated.calibration
    with pytest.raises(DataError, match="neither a checkpoint file"):
        load_model("no-such-model", registry=root)
    x = images(3, seed=6)
    hot, cold = clf.predict(x), uncalibrated.predict(x)
    assert (hot["pred_label"] == cold["pred_label"]).all() and (hot["max_prob"] <= cold["max_prob"] + 1e-6).all()


@pytest.mark.slow
def test_train_fine_tunes_from_a_registered_model(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    mid = install_production_model(root, img_size=32)
    sets = [
        "data.synthetic.num_images=60", "data.synthetic.image_size=32", "model.name=astroformer_pico", "model.img_size=32",
        "train.epochs=1", "train.batch_size=16", "train.warmup_epochs=0", "train.workers=0", "shard.max_samples_per_shard=20",
    ]
    result = train(workdir=tmp_path / "w", overrides=sets, finetune_from="production", registry=root)
    clf = load_model(result["checkpoint"])
    assert clf.model.config.model.pretrained == str((root / "candidates" / mid / "model.pt").resolve())
    assert clf.model_id != mid and len(clf.predict(images(2, seed=7))) == 2
    with pytest.raises(WouldOverwrite, match="--resume to continue it or --force"):
        train(workdir=tmp_path / "w", overrides=sets)

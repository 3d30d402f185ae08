"""data.center_crop (a fraction of the side) and data.resize: the same for every source, and for raw inputs at predict."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GAP_MODEL, make_checkpoint
from pipeline.api import Classifier
from pipeline.data.prepare import DATASET_FILE, PreparedDataset
from pipeline.data.transforms import eval_batch_transform
from pipeline.score.trained_model import TorchBackend, TrainedModel

CLASSES = ["a", "b"]


def galaxy(size: int) -> np.ndarray:
    """One smooth, asymmetric field (an off-centre blob and a bright corner outside the central half) at ``size`` px."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-((xx - 0.42) ** 2 + (yy - 0.56) ** 2) / 0.006)
    corner = (xx < 0.2) & (yy < 0.2)
    field = 40 + 180 * blob + 30 * corner
    return np.stack([field, 0.8 * field, 0.5 * field + 20 * xx], axis=-1).round().astype(np.uint8)


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", *args, "--workdir", str(workdir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def class_sets(*extra: str) -> list[str]:
    return [f"data.class_names=[{','.join(CLASSES)}]", "validate.require_all_classes=false", *(f"{e}" for e in extra)]


def write_folder(root: Path, images: dict[str, np.ndarray]) -> Path:
    (root / "img").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "path"])
        for i, (name, image) in enumerate(images.items()):
            Image.fromarray(image).save(root / "img" / f"{name}.png")
            w.writerow([name, i % 2, f"img/{name}.png"])
    return root


def prepared_images(workdir: Path, *sets: str) -> np.ndarray:
    proc = cli(workdir, "prepare", *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = PreparedDataset(workdir / "data/prepared" / DATASET_FILE)
    return np.concatenate([b.images for b in ds.iter_batches(64)])


def test_h5_and_folder_of_one_field_at_two_scales_prepare_to_the_same_pixels(tmp_path: Path) -> None:
    big = galaxy(512)
    small = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.BOX))
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["images"] = np.stack([small, small])
        f["ans"] = np.array([0, 1], dtype=np.uint8)
    folder = write_folder(tmp_path / "folder", {"g0": big, "g1": big})
    geometry = ["data.center_crop=0.5", "data.resize=48"]
    from_h5 = prepared_images(tmp_path / "w_h5", *class_sets("data.source=h5", f"data.path={tmp_path / 'g.h5'}", *geometry))
    from_png = prepared_images(tmp_path / "w_png", *class_sets("data.source=folder", f"data.path={folder}", *geometry))
    assert from_h5.shape == from_png.shape == (2, 48, 48, 3)
    diff = np.abs(from_h5.astype(int) - from_png.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 6  # resampling tolerance only
    uncropped = np.asarray(Image.fromarray(small).resize((48, 48), Image.Resampling.LANCZOS))
    assert np.abs(from_h5[0].astype(int) - uncropped.astype(int)).mean() > 10  # the crop did happen


def test_synthetic_source_is_cropped_too(tmp_path: Path) -> None:
    sets = ["data.synthetic.num_images=4", "data.synthetic.image_size=64", "data.center_crop=0.25", "validate.image_shape=[16,16,3]"]
    assert prepared_images(tmp_path / "w", *sets).shape == (4, 16, 16, 3)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_bad_center_crop_exits_2_naming_the_key(tmp_path: Path, value: str) -> None:
    proc = cli(tmp_path, "prepare", "--set", f"data.center_crop={value}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "data.center_crop" in line]
    assert len(errors) == 1 and value in errors[0]


def test_predict_on_raw_files_applies_the_models_crop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = galaxy(80)
    planted[30:36, 28:34] = [255, 0, 0]  # inside the central half, off-centre: any other crop moves it
    folder = write_folder(tmp_path / "folder", {"g0": planted, "g1": planted[::-1].copy()})
    geometry = ["data.center_crop=0.5", "data.resize=24"]
    prepared = prepared_images(tmp_path / "w", *class_sets("data.source=folder", f"data.path={folder}", *geometry))
    ckpt = make_checkpoint(tmp_path / "m.pt", GAP_MODEL, img_size=16, overrides=[*class_sets(*geometry)])
    model = TrainedModel.load(ckpt)
    seen: list[torch.Tensor] = []
    logits = TorchBackend.logits
    monkeypatch.setattr(TorchBackend, "logits", lambda self, x: (seen.append(x.clone()), logits(self, x))[1])
    Classifier(model, 1.0, "none").predict_input(folder)
    expected = eval_batch_transform(16, model.input_range)(list(prepared))
    assert torch.equal(torch.cat(seen), expected)


def test_a_prepared_dataset_given_to_predict_is_not_cropped_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_folder(tmp_path / "folder", {"g0": galaxy(80), "g1": galaxy(80)[::-1].copy()})
    geometry = ["data.center_crop=0.5", "data.resize=24"]
    prepared = prepared_images(tmp_path / "w", *class_sets("data.source=folder", f"data.path={folder}", *geometry))
    model = TrainedModel.load(make_checkpoint(tmp_path / "m.pt", GAP_MODEL, img_size=24, overrides=[*class_sets(*geometry)]))
    seen: list[torch.Tensor] = []
    logits = TorchBackend.logits
    monkeypatch.setattr(TorchBackend, "logits", lambda self, x: (seen.append(x.clone()), logits(self, x))[1])
    Classifier(model, 1.0, "none").predict_input(tmp_path / "w/data/prepared" / DATASET_FILE, kind="h5")
    assert torch.equal(torch.cat(seen), eval_batch_transform(24, model.input_range)(list(prepared)))


def test_a_checkpoint_from_before_the_fraction_loads_without_a_crop(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "m.pt", GAP_MODEL, img_size=16)
    payload = torch.load(ckpt, weights_only=False)
    payload["config"]["data"].pop("center_crop")
    payload["config"]["data"].pop("resize")
    payload["config"]["data"]["folder"].update(center_crop=200, resize=72)
    model = TrainedModel(ckpt, payload, "old")
    assert not model.geometry

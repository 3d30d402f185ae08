"""The train stage: learning, exact resume, checkpoint safety, augmentations, batching, recipe pieces, presets."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.learn import recipe
from pipeline.learn import train as T
from pipeline.learn.outputs import HISTORY_COLUMNS
from pipeline.learn.augment import TrainTransform, d4_transform, inscribed_side, rotate_crop
from pipeline.learn.checkpoint import FORMAT, load_checkpoint, load_model, save_checkpoint
from pipeline.config import Config, TrainConfig, dump_params, load_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.data.reader import iter_split
from pipeline.data.sources.synthetic import CLASS_NAMES
from pipeline.data.transforms import eval_transform, normalize_batch
from conftest import FOUR_CLASSES, four_class_data, write_four_class_shards

ROOT = Path(__file__).resolve().parents[1]
DATA = four_class_data(per_shard=50)
# Small, fast and still exercising every source of randomness: dropout paths, mixup, RandAugment, d4, EMA.
BASE = [
    "model.name=astroformer_pico",
    "model.img_size=32",
    "model.drop_path_rate=0.1",
    "train.batch_size=8",
    "train.opt=adamw",
    "train.lr=0.003",
    "train.warmup_epochs=1",
    "train.sched_on_updates=true",
    "train.workers=0",
    "train.shuffle_buffer=64",
    "train.deterministic=true",
    "train.device=cpu",
]


def _cfg(*extra: str) -> Config:
    return load_config(None, DATA + BASE + list(extra))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 synthetic galaxies of 4 well-separated classes at 32 px: 280 train / 120 val in 50-sample shards."""
    return write_four_class_shards(tmp_path_factory.mktemp("train_data"), _cfg(), 400)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, by a dotted path, so two runs compare tensor by tensor."""
    payload = torch.load(path, weights_only=True)
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    for key in ("model", "optimizer", "ema"):
        walk(key, payload[key])
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------- learning


@pytest.mark.slow
def test_learns_synthetic_galaxies_well_above_chance(shards: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        "train.epochs=6", "train.batch_size=32", "train.lr=0.005", "train.mixup_alpha=0",
        "train.randaugment=null", "train.weight_decay=0.05", "model.drop_path_rate=0",
    )
    summary = T.train(cfg, shards, tmp_path, progress=False)

    # 4 balanced classes: chance is 0.25; a broken pipeline (shuffled labels, garbled images) stays near it
    assert summary["best"]["val_top1"] >= 0.6, summary
    assert summary["best"]["val_macro_f1"] >= 0.5, summary
    with open(tmp_path / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_run"] == 6 and metrics["params"] > 0 and metrics["images_per_s"] > 0

    model, loaded_cfg, payload = load_model(tmp_path / "best.pt")
    assert payload["epoch"] == summary["best_epoch"] and loaded_cfg.model.img_size == 32
    assert payload["class_names"] == [CLASS_NAMES[k] for k in FOUR_CLASSES]
    # best.pt re-scores the reported validation accuracy through the eval preprocessing (other batch sizes
    # may round a near-tie differently, so one sample of slack)
    tf = eval_transform(32, loaded_cfg.train.input_range)
    images, labels = zip(*((tf(r.image), r.label) for r in iter_split(shards, "val")))
    with torch.no_grad():
        preds = model(torch.stack(images)).argmax(1)
    acc = (preds == torch.tensor(labels)).double().mean().item()
    assert acc == pytest.approx(summary["best"]["val_top1"], abs=1.01 / len(labels))


# ---------------------------------------------------------------- exact resume


RESUME = ["train.epochs=3", "train.max_steps_per_epoch=6", "train.ema=true", "train.ema_decay=0.9"]


@pytest.fixture(scope="module")
def reference_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three uninterrupted epochs; the resumed runs must end with these exact tensors."""
    out = tmp_path_factory.mktemp("reference")
    T.train(_cfg(*RESUME, "train.workers=2"), shards, out, progress=False)
    return out


def test_resume_after_sigkill_mid_epoch_is_exact(shards: Path, reference_run: Path, tmp_path: Path) -> None:
    cfg = _cfg(*RESUME, "train.workers=2")
    params = tmp_path / "params.yaml"
    dump_params(cfg, params)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--params", str(params), "--shards", str(shards), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the progress lines say where training is
    env["ASTROFLOW_PROGRESS_EVERY_S"] = "0"  # a line per step (in a log file, lines are 10 s apart by default)
    log = tmp_path / "stderr.txt"
    # a progress line of epoch 2 or 3 with some but not all of its 6 steps done: the run is inside an epoch
    inside = re.compile(r"epoch [23]/3: [1-5]/6 step")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not inside.search(log.read_text(errors="replace")):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "never saw an epoch after the first in progress"
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert load_checkpoint(out / T.LAST)["epoch"] in (1, 2)

    summary = T.train(cfg, shards, out, resume=True, progress=False)
    assert summary["epochs_run"] == 3
    _assert_same_weights(reference_run / T.LAST, out / T.LAST)
    ref_best, best = torch.load(reference_run / T.BEST, weights_only=True), torch.load(out / T.BEST, weights_only=True)
    assert ref_best["epoch"] == best["epoch"]
    assert all(torch.equal(ref_best["model"][k], best["model"][k]) for k in ref_best["model"])


def test_resume_after_exception_mid_epoch_is_exact(
    shards: Path, reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(*RESUME, "train.workers=2")
    calls = itertools.count(1)
    real = T.normalize_batch

    def failing(images: torch.Tensor, input_range: str) -> torch.Tensor:
        # validation (under inference mode) normalises too; count training steps only
        if not torch.is_inference_mode_enabled() and next(calls) == 6 + 3:  # the 3rd step of epoch 2
            raise KeyboardInterrupt
        return real(images, input_range)

    monkeypatch.setattr(T, "normalize_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, shards, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / T.LAST)["epoch"] == 1
    monkeypatch.setattr(T, "normalize_batch", real)

    T.train(cfg, shards, tmp_path, resume=True, progress=False)
    _assert_same_weights(reference_run / T.LAST, tmp_path / T.LAST)
    history = [r["epoch"] for r in torch.load(tmp_path / T.LAST, weights_only=True)["history"]]
    assert history == [1, 2, 3]


def test_seed_decides_the_weights(shards: Path, tmp_path: Path) -> None:
    """Same seed, same weights; another seed, other weights: the equality tests above are not trivially true."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = _cfg("train.epochs=1", "train.max_steps_per_epoch=2", "train.ema=true", f"train.seed={seed}")
        T.train(cfg, shards, tmp_path / name, progress=False)
        runs[name] = _tensors(tmp_path / name / T.LAST)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_resume_of_finished_run_trains_nothing(shards: Path, reference_run: Path, tmp_path: Path) -> None:
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / T.LAST).read_bytes()
    summary = T.train(_cfg(*RESUME, "train.workers=2"), shards, tmp_path, resume=True, progress=False)
    assert summary["epochs_run"] == 3
    assert (tmp_path / T.LAST).read_bytes() == before


# ---------------------------------------------------------------- bad checkpoints


class Unsafe:
    """Any class outside torch's allow-list: ``weights_only=True`` must refuse to unpickle it."""


def _corrupt(kind: str, good: Path, target: Path) -> list[str]:
    data = good.read_bytes()
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        target.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "unsafe-pickle":
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "model": {}, "evil": Unsafe()}, buf)
        target.write_bytes(buf.getvalue())
    elif kind == "other-model":
        target.write_bytes(data)
        return ["model.name=astroformer_nano"]
    elif kind == "other-class-count":
        payload = torch.load(good, weights_only=True)
        payload["class_names"] = payload["class_names"][:3]
        save_checkpoint(target, payload)
    elif kind == "weights-of-other-shape":
        payload = torch.load(good, weights_only=True)
        payload["model"]["head.fc.weight"] = torch.zeros(7, 3)
        save_checkpoint(target, payload)
    elif kind == "inference-checkpoint":
        target.write_bytes((good.parent / T.BEST).read_bytes())
    return []


@pytest.mark.parametrize(
    "kind",
    ["truncated", "random-bytes", "unsafe-pickle", "other-model", "other-class-count", "weights-of-other-shape", "inference-checkpoint"],
)
def test_bad_checkpoint_is_refused_on_resume(kind: str, shards: Path, reference_run: Path, tmp_path: Path) -> None:
    extra = _corrupt(kind, reference_run / T.LAST, tmp_path / T.LAST)
    with pytest.raises(CheckpointError) as err:
        T.train(_cfg(*RESUME, *extra), shards, tmp_path, resume=True, progress=False)
    assert str(tmp_path / T.LAST) in str(err.value)


# ---------------------------------------------------------------- early stopping


def test_early_stopping_keeps_best_epoch(shards: Path, tmp_path: Path) -> None:
    # with an lr of ~0 only batch-norm statistics move: the metric soon stops improving
    cfg = _cfg("train.epochs=8", "train.max_steps_per_epoch=1", "train.lr=1e-12", "train.warmup_epochs=0",
               "train.early_stopping_patience=2", "train.mixup_alpha=0")
    summary = T.train(cfg, shards, tmp_path, progress=False)
    assert summary["stopped_early"] and summary["epochs_run"] == summary["best_epoch"] + 2 < 8
    top1 = [r["val_top1"] for r in torch.load(tmp_path / T.LAST, weights_only=True)["history"]]
    assert max(top1[-2:]) <= top1[summary["best_epoch"] - 1] == max(top1)
    assert load_checkpoint(tmp_path / T.BEST)["epoch"] == summary["best_epoch"]
    # resuming a stopped run does not train on
    assert T.train(cfg, shards, tmp_path, resume=True, progress=False)["epochs_run"] == summary["epochs_run"]


# ---------------------------------------------------------------- augmentation


def _image(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _geometry_only(rotation: str, size: int = 32) -> TrainTransform:
    return TrainTransform(TrainConfig(rotation=rotation, randaugment=None, random_resized_crop=False), size)


@pytest.mark.parametrize("rotation, expected", [("d4", 8), ("rot90", 4)])
def test_rotations_are_exact_symmetries(rotation: str, expected: int) -> None:
    img = _image()
    views = {(k, f): d4_transform(img, k, f) for k in range(4) for f in (False, True)}
    assert len({v.tobytes() for v in views.values()}) == 8
    tf = _geometry_only(rotation)
    random.seed(0)
    seen = set()
    for _ in range(200):
        out = tf(img)
        match = [key for key, v in views.items() if np.array_equal(out, v)]
        assert match, "output is not an exact rotation/flip of the input"
        seen.add(match[0])
    assert len(seen) == expected
    if rotation == "rot90":
        assert all(not flip for _, flip in seen)


def test_any_rotation_leaves_no_empty_corners() -> None:
    white = np.full((64, 64, 3), 255, np.uint8)
    tf = _geometry_only("any", 32)
    random.seed(0)
    for _ in range(100):
        assert tf(white).min() == 255
    for angle in (10.0, 45.0, 137.0, 300.0):
        rotated = np.asarray(rotate_crop(Image.fromarray(white), angle))
        assert rotated.min() == 255 and rotated.shape[0] == inscribed_side(64, angle) - 4
        # the crop is what removes the corners: the uncropped rotation has them
        assert np.asarray(Image.fromarray(white).rotate(angle)).min() == 0
    # and it does rotate: a horizontal gradient turns into a tilted one
    gradient = np.tile((np.arange(64, dtype=np.uint8) * 4)[None, :, None], (64, 1, 3))
    out = np.asarray(rotate_crop(Image.fromarray(gradient), 30.0)).astype(int)
    assert (np.diff(out[:, out.shape[1] // 2, 0]) != 0).mean() > 0.5  # columns now vary top to bottom


def test_train_transform_with_everything_on_keeps_shape_and_dtype() -> None:
    cfg = TrainConfig(rotation="any", hflip=True, random_resized_crop=True, randaugment="rand-m9-n2-mstd0.5")
    out = TrainTransform(cfg, 32)(_image(64))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_normalize_batch_matches_eval_transform() -> None:
    img = _image()
    for input_range in ("imagenet", "minus_one_one"):
        batch = torch.from_numpy(img[None]).permute(0, 3, 1, 2)
        assert torch.equal(normalize_batch(batch, input_range)[0], eval_transform(32, input_range)(img))


# ---------------------------------------------------------------- recipe pieces


def test_exponential_schedule_decays_by_rate_every_decay_steps() -> None:
    cfg = load_config(None, ["train.sched=exponential", "train.lr=0.002", "train.decay_rate=0.01",
                             "train.decay_steps=10000", "train.warmup_epochs=0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = recipe.build_scheduler(opt, cfg, updates_per_epoch=100)
    for step, factor in ((0, 1.0), (5000, 0.1), (10000, 0.01), (20000, 1e-4)):
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * factor, rel=1e-6)


def test_cosine_schedule_warms_up_from_warmup_lr() -> None:
    cfg = load_config(None, ["train.epochs=10", "train.warmup_epochs=2", "train.lr=0.01", "train.warmup_lr=0.001"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = recipe.build_scheduler(opt, cfg, updates_per_epoch=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    sched.step(1)
    assert opt.param_groups[0]["lr"] == pytest.approx((0.001 + 0.01) / 2)
    lo = cfg.train.min_lr
    for epoch in (2, 5, 9):  # timm's default: the warmup overlaps the start of the cosine (no prefix)
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(lo + 0.5 * (0.01 - lo) * (1 + math.cos(math.pi * epoch / 10)))


def test_amp_on_cpu_runs_or_falls_back_with_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    assert recipe.amp_dtype("none", torch.device("cpu")) is None
    assert recipe.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    fp16 = recipe.amp_dtype("fp16", torch.device("cpu"))
    assert fp16 == torch.float16 or any("float32" in str(w.message) for w in recwarn.list)


def test_unavailable_pretrained_weights_fall_back_to_scratch(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["model.pretrained=true", "model.img_size=32"])
    with caplog.at_level("WARNING"):
        model = recipe.build_train_model(cfg, num_classes=4)
    assert model.num_classes == 4
    assert "pretrained weights unavailable, training from scratch" in caplog.text


def test_batch_larger_than_the_split_is_a_config_error(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        T.train(_cfg("train.batch_size=1000"), shards, tmp_path, progress=False)


# ---------------------------------------------------------------- presets


def test_presets_load() -> None:
    paper = load_config(ROOT / "configs" / "astroformer_galaxy10.yaml")
    assert paper.data.source == "galaxy10" and paper.model.name == "astroformer_4" and paper.model.img_size == 256
    assert (paper.train.opt, paper.train.lr, paper.train.sched, paper.train.warmup_epochs) == ("lookahead_radam", 2e-5, "cosine", 5)
    assert (paper.train.mixup_alpha, paper.train.label_smoothing, paper.train.amp) == (0.8, 0.1, "bf16")
    mobile = load_config(ROOT / "configs" / "mobilevit_s.yaml")
    assert mobile.model.name == "mobilevit_s" and mobile.model.pretrained is True
    assert (mobile.train.sched, mobile.train.decay_rate, mobile.train.decay_steps) == ("exponential", 0.01, 10000)
    assert mobile.train.input_range == "minus_one_one" and mobile.train.early_stopping_patience == 5

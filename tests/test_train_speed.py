"""Training speed (issue 11): the thread policy, one loader for all epochs, cached validation, background writes,
device-side augmentation, fused optimizers and regional compilation."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Config, TrainConfig, load_config
from pipeline.data import reader
from pipeline.data.reader import EpochStream, StreamSpec, make_loader
from pipeline.data.shards import shard_urls
from pipeline.data.transforms import resize, to_nchw
from pipeline.learn import recipe
from pipeline.learn import train as T
from pipeline.learn.augment import DeviceAugment, TrainTransform, augment_on_device, d4_batch, d4_transform
from pipeline.runtime import ThreadTrial, pick_threads
from conftest import four_class_data, write_four_class_shards

DATA = four_class_data(per_shard=40)
BASE = [
    "model.name=astroformer_pico",
    "model.img_size=32",
    "train.batch_size=8",
    "train.opt=adamw",
    "train.mixup_alpha=0",
    "train.randaugment=null",
    "train.shuffle_buffer=32",
    "train.deterministic=true",
    "train.device=cpu",
    "train.ema=true",
    "train.ema_decay=0.9",
]


def _cfg(*extra: str) -> Config:
    return load_config(None, DATA + BASE + list(extra))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 synthetic galaxies of 4 classes at 32 px: 140 train / 60 val in 40-sample shards."""
    return write_four_class_shards(tmp_path_factory.mktemp("speed_data"), _cfg(), 200)


# ---------------------------------------------------------------- thread policy


def test_thread_policy_gives_a_compute_bound_model_every_core() -> None:
    # 2 cores, 1 decode worker: the model's step dominates, so two threads finish steps sooner despite the worker
    assert pick_threads({2: [1.05, 1.10, 1.02], 1: [1.80, 1.75, 1.90]}) == 2
    # decode-bound: the model waits for the worker, and sharing its core with the worker makes that worse
    assert pick_threads({2: [0.52, 0.50, 0.55], 1: [0.45, 0.46, 0.44]}) == 1
    assert pick_threads({2: [0.5, 0.5, 0.5], 1: [0.5, 0.5, 0.5]}) == 2  # a tie keeps every core


def test_thread_trial_interleaves_candidates_then_keeps_the_faster() -> None:
    before = torch.get_num_threads()
    try:
        trial = ThreadTrial((2, 1), rounds=3, warmup=1)
        step_time = {2: 1.0, 1: 1.8}  # compute-bound: the step time halves... nearly, with twice the threads
        used = []
        for _ in range(10):
            trial.before_step()
            used.append(torch.get_num_threads())
            chosen = trial.after_step(step_time[torch.get_num_threads()])
            if chosen is not None:
                break
        assert used == [1, 2, 1, 2, 1, 2, 1]  # warm-up with the fewest threads, then interleaved
        assert chosen == 2 and trial.chosen == 2 and torch.get_num_threads() == 2
        # other processes take a core: two threads now wait at every barrier; the trial runs again and switches,
        # after one step each since the gap is clear
        step_time = {2: 5.0, 1: 1.9}
        decided, used = [], []
        for _ in range(10):
            trial.before_step()
            used.append(torch.get_num_threads())
            decided.append(trial.after_step(step_time[torch.get_num_threads()]))
        assert used == [2] * 8 + [2, 1]
        assert decided[-1] == 1 and trial.chosen == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_thread_trial_tries_every_core_again_after_load_has_gone() -> None:
    before = torch.get_num_threads()
    try:
        trial = ThreadTrial((2, 1), rounds=3, warmup=1, retry_every=20)
        step_time = {2: 6.5, 1: 1.6}  # another job during the trial: every core was slow, one thread chosen
        chosen = None
        while chosen is None:
            trial.before_step()
            chosen = trial.after_step(step_time[torch.get_num_threads()])
        assert chosen == 1
        # the job ends: one thread runs as before, so nothing looks slower, but the periodic trial finds every core faster
        step_time = {2: 1.0, 1: 1.6}
        decided = []
        for _ in range(30):
            trial.before_step()
            decided.append(trial.after_step(step_time[torch.get_num_threads()]))
        assert 2 in decided and trial.chosen == 2
        # with every core chosen there is nothing to retry on a timer
        assert all(trial.after_step(1.0) is None for _ in range(50)) and trial.chosen == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- one stream for every epoch


def test_epoch_stream_gives_each_epoch_the_batches_of_a_fresh_loader(shards: Path) -> None:
    urls = tuple(shard_urls(shards, "train"))
    # 5 steps over 2 workers: uneven, so a continuing round-robin would drift without the surplus batches
    spec = StreamSpec(urls=urls, batch_size=8, steps=5, shuffle_buffer=16, stratify=(0, 1, 2, 3), epoch=1, epochs=3)
    stream = EpochStream(spec, lambda im: im, workers=2, pin_memory=False)
    try:
        continued = [[(x, y) for x, y, _, _ in stream.next_epoch()] for _ in range(3)]
    finally:
        stream.close()
    for i, epoch in enumerate((1, 2, 3)):
        alone = StreamSpec(**{**spec.__dict__, "epoch": epoch, "epochs": 1})
        fresh = [(x, y) for x, y, _, _ in make_loader(alone, lambda im: im, 2, False)]
        assert len(continued[i]) == len(fresh) == 5
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(continued[i], fresh)), epoch


def _epochs(spec: StreamSpec, transform: TrainTransform, workers: int, cache_bytes: int) -> list[list[tuple[torch.Tensor, ...]]]:
    stream = EpochStream(spec, transform, workers, False, cache_bytes)
    try:
        return [[(x, y) for x, y, _, _ in stream.next_epoch()] for _ in range(spec.epochs)]
    finally:
        stream.close()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("rotation, crop", [("d4", False), ("rot90", False), ("rot90", True), ("any", False)])
@pytest.mark.parametrize("cache_images", [1000, 20])  # all of the split, or a budget that fills after 20 images
def test_training_set_cache_gives_the_batches_of_decoding(
    shards: Path, workers: int, rotation: str, crop: bool, cache_images: int
) -> None:
    # 32 px shards trained at 24 px: the cache keeps the resized image where that is exact (no crop, exact rotations)
    t = _cfg(f"train.rotation={rotation}", f"train.random_resized_crop={crop}", "train.hflip=true").train
    spec = StreamSpec(urls=tuple(shard_urls(shards, "train")), batch_size=8, steps=6, shuffle_buffer=16, stratify=(0, 1, 2, 3), epochs=3)
    decoded = _epochs(spec, TrainTransform(t, 24), workers, 0)
    cached = _epochs(spec, TrainTransform(t, 24), workers, cache_images * 32 * 32 * 3)
    for epoch, (a, b) in enumerate(zip(decoded, cached)):
        assert len(a) == len(b) == 6
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b)), epoch


def test_training_set_cache_decodes_each_image_once(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = reader.decode_image
    monkeypatch.setattr(reader, "decode_image", lambda sample: (calls.append(1), real(sample))[1])
    t = _cfg("train.rotation=d4").train
    # 17 steps of 8 cover most of the 140 training images: each is decoded when first batched, never again
    spec = StreamSpec(urls=tuple(shard_urls(shards, "train")), batch_size=8, steps=17, shuffle_buffer=16, epochs=3)
    stream = EpochStream(spec, TrainTransform(t, 24), 0, False, 2**30)
    per_epoch = []
    try:
        for _ in range(3):
            before = len(calls)
            list(stream.next_epoch())
            per_epoch.append(len(calls) - before)
    finally:
        stream.close()
    assert per_epoch[0] >= 128 and sum(per_epoch) == 140 and per_epoch[-1] == 0, per_epoch
    assert TrainTransform(t, 24).cache_form(np.zeros((32, 32, 3), np.uint8)).shape == (24, 24, 3)
    assert TrainTransform(_cfg("train.random_resized_crop=true").train, 24).cache_form(np.zeros((32, 32, 3), np.uint8)).shape == (32, 32, 3)


def _count_loaders(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record every loader the trainer makes (True: a training stream) by wrapping the reader's make_loader."""
    made: list[bool] = []
    real = reader.make_loader

    def counting(spec: StreamSpec, *args: object) -> object:
        made.append(spec.train)
        return real(spec, *args)

    monkeypatch.setattr(reader, "make_loader", counting)
    monkeypatch.setattr(T, "make_loader", counting)
    return made


def test_workers_start_once_per_run_and_validation_decodes_once(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _count_loaders(monkeypatch)
    T.train(_cfg("train.epochs=3", "train.max_steps_per_epoch=3", "train.workers=2"), shards, tmp_path, progress=False)
    assert made == [True, False]  # one training stream, one validation pass that decodes; the others read the cache


def test_resume_with_one_stream_is_exact(shards: Path, tmp_path: Path) -> None:
    cfg = _cfg("train.epochs=3", "train.max_steps_per_epoch=5", "train.workers=2")
    T.train(cfg, shards, tmp_path / "ref", progress=False)
    short = _cfg("train.epochs=1", "train.max_steps_per_epoch=5", "train.workers=2")
    T.train(short, shards, tmp_path / "resumed", progress=False)
    T.train(cfg, shards, tmp_path / "resumed", resume=True, progress=False)
    ref = torch.load(tmp_path / "ref" / T.LAST, weights_only=True)
    got = torch.load(tmp_path / "resumed" / T.LAST, weights_only=True)
    for key in ("model", "ema"):
        assert ref[key].keys() == got[key].keys()
        assert all(torch.equal(ref[key][k], got[key][k]) for k in ref[key]), key


def test_checkpoints_are_written_beside_training(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = T.save_checkpoint

    def recording(path: Path, payload: dict) -> None:
        threads.append(threading.current_thread().name)
        real(path, payload)

    monkeypatch.setattr(T, "save_checkpoint", recording)
    T.train(_cfg("train.epochs=2", "train.max_steps_per_epoch=2", "train.workers=0"), shards, tmp_path, progress=False)
    assert threads and threading.main_thread().name not in threads
    assert torch.load(tmp_path / T.LAST, weights_only=True)["epoch"] == 2


def test_a_failed_background_write_fails_the_run(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(path: Path, payload: dict) -> None:
        raise OSError(f"{path}: disk full")

    monkeypatch.setattr(T, "save_checkpoint", failing)
    with pytest.raises(OSError, match="disk full"):
        T.train(_cfg("train.epochs=2", "train.max_steps_per_epoch=2", "train.workers=0"), shards, tmp_path, progress=False)


# ---------------------------------------------------------------- device-side augmentation


def _images(n: int = 16, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("rotation, hflip", [("d4", False), ("rot90", False), ("rot90", True), ("none", True)])
def test_device_augmentation_equals_the_per_sample_cpu_path(rotation: str, hflip: bool) -> None:
    """Today's per-sample transform (rotate/flip at full size, then resize) against resize, then the batch on the device."""
    train = TrainConfig(rotation=rotation, hflip=hflip, randaugment=None, random_resized_crop=False, device_augment=True)
    images = _images()
    random.seed(7)
    cpu = torch.stack([torch.from_numpy(TrainTransform(train, 24)(im)).permute(2, 0, 1) for im in images])
    # the draws TrainTransform made, in its order: quarter turns, the d4 flip, the extra flip
    random.seed(7)
    k, flip, extra = [], [], []
    for _ in images:
        k.append(random.randrange(4) if rotation in ("rot90", "d4") else 0)
        flip.append(rotation == "d4" and random.random() < 0.5)
        extra.append(hflip and random.random() < 0.5)
    batch = resize(to_nchw(np.stack(images)), 24)
    assert not torch.equal(batch, cpu)  # the draws did rotate or flip something
    device = d4_batch(batch, torch.tensor(k), torch.tensor(flip), torch.tensor(extra))
    assert torch.equal(device, cpu)


def test_device_rotations_only_never_flip() -> None:
    image = _images(1, 24)[0]
    rotations = [d4_transform(image, k, False) for k in range(4)]
    flips = [d4_transform(image, k, True) for k in range(4)]
    aug = DeviceAugment(TrainConfig(rotation="rot90", device_augment=True))
    aug.reseed(0)
    out = aug(to_nchw(np.stack([image] * 64)))
    seen = set()
    for view in out.permute(0, 2, 3, 1).numpy():
        assert not any(np.array_equal(view, f) for f in flips)
        seen.update(k for k, r in enumerate(rotations) if np.array_equal(view, r))
    assert seen == {0, 1, 2, 3}
    k, flip, hflip = aug.draw(1000)
    assert not flip.any() and not hflip.any()


def test_device_augmentation_follows_config() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert augment_on_device(TrainConfig(rotation="d4"), cuda)
    assert not augment_on_device(TrainConfig(rotation="d4"), cpu)
    assert augment_on_device(TrainConfig(rotation="d4", device_augment=True), cpu)
    assert not augment_on_device(TrainConfig(rotation="any", device_augment=True), cuda)
    assert not augment_on_device(TrainConfig(rotation="d4", device_augment=False), cuda)
    # with geometry on the device, the loader's transform does not rotate
    tf = TrainTransform(TrainConfig(rotation="d4", randaugment=None), 24, geometry=False)
    image = _images(1, 24)[0]
    random.seed(0)
    assert all(np.array_equal(tf(image), image) for _ in range(20))


def test_training_with_device_augmentation_on_the_cpu(shards: Path, tmp_path: Path) -> None:
    out = T.train(
        _cfg("train.epochs=1", "train.max_steps_per_epoch=3", "train.device_augment=true", "train.hflip=true"),
        shards, tmp_path, progress=False,
    )
    assert out["epochs_run"] == 1 and (tmp_path / T.BEST).is_file()


# ---------------------------------------------------------------- optimizer and compilation


def test_fused_optimizer_on_cuda_where_torch_has_one() -> None:
    model = torch.nn.Linear(4, 2)  # CPU parameters: torch's fused AdamW/SGD also run on the CPU
    cuda = torch.device("cuda")
    assert recipe.build_optimizer(model, TrainConfig(opt="adamw"), cuda).defaults["fused"] is True
    assert not recipe.build_optimizer(model, TrainConfig(opt="adamw"), torch.device("cpu")).defaults.get("fused")
    recipe.build_optimizer(model, TrainConfig(opt="lookahead_radam"), cuda)  # no fused kernel: built without one


def test_regional_compile_takes_the_innermost_repeated_blocks() -> None:
    from models.factory import create_model

    model = create_model("astroformer_0", num_classes=4, img_size=64)
    blocks = recipe.repeated_blocks(model)
    assert {type(b).__name__ for b in blocks} == {"MbConvBlock", "TransformerBlock2d"}
    assert not any(b in blocks for b in model.stages)  # the stages hold the blocks: not compiled twice


@pytest.mark.slow
def test_regionally_compiled_training_runs_and_reports_first_step(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger=T.__name__)
    cfg = _cfg(
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.compile=true", "train.compile_scope=blocks",
        "train.deterministic=false",
    )
    out = T.train(cfg, shards, tmp_path, progress=False)
    assert out["epochs_run"] == 1
    assert "includes torch.compile" in caplog.text

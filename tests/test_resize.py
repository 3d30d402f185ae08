"""One resize: with augmentation off, training's input is evaluation's input bit for bit, at any scale."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from timm.data.transforms import RandomResizedCropAndInterpolation

from pipeline.config import TrainConfig
from pipeline.data.transforms import eval_batch_transform, eval_transform, normalize_batch, resize, resize_image, to_nchw
from pipeline.learn.augment import CROP_RATIO, CROP_SCALE, TrainTransform, d4_transform

SIZE = 32
OFF = TrainConfig(rotation="none", hflip=False, random_resized_crop=False, randaugment=None)


def _image(height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width or height, 3), dtype=np.uint8)


def _train_input(transform: TrainTransform, image: np.ndarray, input_range: str) -> torch.Tensor:
    """What training feeds the model: the augmented uint8 image, collated to NCHW, normalised."""
    batch = torch.from_numpy(np.stack([transform(image)])).permute(0, 3, 1, 2)
    return normalize_batch(batch, input_range)[0]


@pytest.mark.parametrize("side", [32, 64, 48, 37, 20], ids=["same", "x2", "x1.5", "x37/32", "enlarge"])
@pytest.mark.parametrize("input_range", ["imagenet", "minus_one_one"])
def test_train_and_eval_give_the_same_tensor(side: int, input_range: str) -> None:
    image = _image(side)
    train = _train_input(TrainTransform(OFF, SIZE), image, input_range)
    assert train.shape == (3, SIZE, SIZE)
    assert torch.equal(train, eval_transform(SIZE, input_range)(image))
    # and prediction's batched path, with images of other sizes in the batch
    batch = eval_batch_transform(SIZE, input_range)([_image(50, seed=1), image, _image(SIZE, seed=2)])
    assert torch.equal(batch[1], train)


def test_deterministic_augmentation_is_eval_of_the_augmented_image() -> None:
    """A seeded d4 draw in training is exactly evaluation's input for the rotated/flipped image."""
    image = _image(48)
    transform = TrainTransform(TrainConfig(rotation="d4", randaugment=None), SIZE)
    for seed in range(8):
        random.seed(seed)
        train = _train_input(transform, image, "imagenet")
        random.seed(seed)
        k, flip = random.randrange(4), random.random() < 0.5
        assert torch.equal(train, eval_transform(SIZE, "imagenet")(d4_transform(image, k, flip)))


def test_random_crop_goes_through_the_same_resize() -> None:
    image = _image(48)
    transform = TrainTransform(TrainConfig(rotation="none", random_resized_crop=True, randaugment=None), SIZE)
    for seed in range(8):
        random.seed(seed)
        out = transform(image)
        random.seed(seed)
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(torch.empty(3, 48, 48), CROP_SCALE, CROP_RATIO)
        assert np.array_equal(out, resize_image(image[top : top + h, left : left + w], SIZE))


def test_resize_is_the_rounded_area_mean_when_shrinking_by_an_integer() -> None:
    image = _image(64)
    mean = image.reshape(SIZE, 2, SIZE, 2, 3).astype(np.float64).mean(axis=(1, 3))
    got = resize_image(image, SIZE).astype(np.float64)
    assert np.abs(got - mean).max() <= 0.5
    same = to_nchw(image)
    assert resize(same, 64) is same  # already at size: untouched

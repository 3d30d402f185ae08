"""Training-time augmentation: geometry on the full-resolution image, then timm's RandAugment.

Galaxies have no preferred orientation, so rotations and flips are label-preserving; ``rot90``/``d4`` use
exact pixel permutations (no interpolation), ``any`` rotates by an arbitrary angle and then keeps only the
central square that the rotated image still covers, so no empty (fill-coloured) corners reach the model.

Every random draw comes from Python's ``random`` module, the generator timm's RandAugment and
``RandomResizedCropAndInterpolation`` already use, so seeding it (and numpy's, which RandAugment also uses)
at the start of an epoch makes the whole augmentation stream reproducible (see ``pipeline.learn.train``).

The transform returns HWC uint8 at ``img_size``; normalisation happens batched on the device
(:func:`normalize_batch`), with the same arithmetic as :func:`pipeline.data.transforms.eval_transform`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from pipeline.config import TrainConfig
from pipeline.data.transforms import normalization, normalize_

CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
ANY_ROTATION_MARGIN = 2  # px kept clear of the rotated border, where bilinear sampling blends in the fill


def d4_transform(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """One of the 8 symmetries of the square: optional horizontal flip, then ``k`` quarter turns (exact)."""
    out = image[:, ::-1] if flip else image
    return np.ascontiguousarray(np.rot90(out, k, axes=(0, 1)))


def inscribed_side(side: int, angle_deg: float) -> int:
    """Side of the largest centred axis-aligned square inside a ``side`` square rotated by ``angle_deg``."""
    theta = math.radians(angle_deg)
    return int(side / (abs(math.cos(theta)) + abs(math.sin(theta))))


def rotate_crop(image: Image.Image, angle_deg: float) -> Image.Image:
    """Rotate by an arbitrary angle, then crop the central square the rotated image fully covers."""
    w, h = image.size
    side = max(1, inscribed_side(min(w, h), angle_deg) - 2 * ANY_ROTATION_MARGIN)
    rotated = image.rotate(angle_deg, resample=Image.Resampling.BILINEAR, expand=False)
    left, top = (w - side) // 2, (h - side) // 2
    return rotated.crop((left, top, left + side, top + side))


def resize(image: Image.Image, img_size: int) -> Image.Image:
    """Area averaging when shrinking (as ``eval_transform``), bilinear when enlarging."""
    if image.size == (img_size, img_size):
        return image
    shrink = image.size[0] > img_size
    return image.resize((img_size, img_size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)


class TrainTransform:
    """HWC uint8 image -> augmented HWC uint8 image at ``img_size`` (picklable, for DataLoader workers)."""

    def __init__(self, train: TrainConfig, img_size: int) -> None:
        self.rotation = train.rotation
        self.hflip = train.hflip
        self.img_size = img_size
        self.crop = (
            RandomResizedCropAndInterpolation(img_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation="bilinear")
            if train.random_resized_crop
            else None
        )
        self.randaugment = None
        if train.randaugment:
            mean, _ = normalization(train.input_range)
            hparams = {
                "translate_const": int(img_size * 0.45),
                "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            }
            self.randaugment = rand_augment_transform(train.randaugment, hparams)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.rotation == "rot90":
            image = d4_transform(image, random.randrange(4), False)
        elif self.rotation == "d4":
            image = d4_transform(image, random.randrange(4), random.random() < 0.5)
        if self.hflip and random.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
        pil = Image.fromarray(image)
        if self.rotation == "any":
            pil = rotate_crop(pil, random.uniform(0.0, 360.0))
        pil = self.crop(pil) if self.crop is not None else resize(pil, self.img_size)
        if self.randaugment is not None:
            pil = self.randaugment(pil)
        return np.asarray(pil)


def train_transform(train: TrainConfig, img_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The configured training augmentation (see :class:`TrainTransform`)."""
    return TrainTransform(train, img_size)


def normalize_batch(images: torch.Tensor, input_range: str) -> torch.Tensor:
    """NCHW uint8 -> normalised float, with ``eval_transform``'s arithmetic so train and eval inputs agree."""
    return normalize_(images.to(torch.float32, copy=True).div_(255.0), input_range)

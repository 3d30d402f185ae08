"""Training-time augmentation: geometry on the full-resolution image, then timm's RandAugment.

Galaxies have no preferred orientation, so rotations and flips are label-preserving; ``rot90``/``d4`` use
exact pixel permutations (no interpolation), ``any`` rotates by an arbitrary angle and then keeps only the
central square that the rotated image still covers, so no empty (fill-coloured) corners reach the model.

Every random draw comes from Python's ``random`` module, the generator timm's RandAugment and
``RandomResizedCropAndInterpolation`` already use, so seeding it (and numpy's, which RandAugment also uses)
at the start of an epoch makes the whole augmentation stream reproducible (see ``pipeline.learn.train``).

Resizing to ``img_size`` (after the optional random crop) is :func:`pipeline.data.transforms.resize`, the one
evaluation and prediction use. The transform returns HWC uint8 at ``img_size``; normalisation happens batched on
the device (:func:`pipeline.data.transforms.normalize_batch`, also evaluation's).

On the device (:class:`DeviceAugment`, ``train.device_augment``). The exact rotations and flips (``rot90``, ``d4``,
``hflip``) can run on the whole batch after the copy to the GPU instead of per sample in the loader workers. They
commute exactly with the shared area resize of a square image (its bins are symmetric), so for the same draws the
batch equals the per-sample path's; the draws come from a torch generator seeded per epoch in the trainer. With
a random crop or RandAugment on, those then act before the rotation instead of after it; both are symmetric under
the 8 rotations/flips (RandAugment's x/y shears and translations swap), so the distribution stays the same.
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
from pipeline.data.transforms import normalization, resize_image

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


def random_crop(image: np.ndarray) -> np.ndarray:
    """timm's RandomResizedCrop box (area 0.8-1, aspect 3/4-4/3, the same random draws), cut without resampling.

    Only the box comes from timm: the resize that follows is the shared one, not timm's Pillow bilinear.
    """
    chw = torch.from_numpy(image).permute(2, 0, 1)  # a view: timm reads the size of a CHW tensor
    top, left, height, width = RandomResizedCropAndInterpolation.get_params(chw, CROP_SCALE, CROP_RATIO)
    return image[top : top + height, left : left + width]


class TrainTransform:
    """HWC uint8 image -> augmented HWC uint8 image at ``img_size`` (picklable, for DataLoader workers).

    ``geometry=False`` leaves the exact rotations/flips to :class:`DeviceAugment`.
    """

    def __init__(self, train: TrainConfig, img_size: int, geometry: bool = True) -> None:
        self.rotation = train.rotation if geometry else "none"
        self.hflip = train.hflip and geometry
        self.img_size = img_size
        self.crop = train.random_resized_crop
        self.randaugment = None
        if train.randaugment:
            mean, _ = normalization(train.input_range)
            hparams = {
                "translate_const": int(img_size * 0.45),
                "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            }
            self.randaugment = rand_augment_transform(train.randaugment, hparams)

    def cache_form(self, image: np.ndarray) -> np.ndarray:
        """What a training-set cache keeps of a decoded image: resized to ``img_size`` when nothing before the resize
        needs the full resolution (exact rotations and flips commute with the area resize of a square image, so
        :meth:`__call__` gives the same pixels for either form), else the image as decoded."""
        if self.crop or self.rotation == "any" or image.shape[0] != image.shape[1]:
            return image
        return resize_image(image, self.img_size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.rotation == "rot90":
            image = d4_transform(image, random.randrange(4), False)
        elif self.rotation == "d4":
            image = d4_transform(image, random.randrange(4), random.random() < 0.5)
        if self.hflip and random.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
        if self.rotation == "any":
            image = np.array(rotate_crop(Image.fromarray(image), random.uniform(0.0, 360.0)))  # writable, for torch
        if self.crop:
            image = random_crop(image)
        image = resize_image(image, self.img_size)
        if self.randaugment is not None:
            image = np.asarray(self.randaugment(Image.fromarray(image)))
        return image


def train_transform(train: TrainConfig, img_size: int, geometry: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """The configured training augmentation (see :class:`TrainTransform`)."""
    return TrainTransform(train, img_size, geometry)


def augment_on_device(train: TrainConfig, device: torch.device) -> bool:
    """Whether the exact rotations/flips run on the device: ``true``, or ``auto`` on CUDA; never for ``any`` rotation."""
    if train.rotation == "any" or (train.rotation == "none" and not train.hflip):
        return False
    return train.device_augment is True or (train.device_augment == "auto" and device.type == "cuda")


def d4_batch(x: torch.Tensor, k: torch.Tensor, flip: torch.Tensor, hflip: torch.Tensor) -> torch.Tensor:
    """Per image of an NCHW batch: :func:`d4_transform` (flip, then ``k`` quarter turns), then the extra ``hflip``.

    ``k``, ``flip`` and ``hflip`` are CPU tensors. The images are grouped by symmetry through one index
    permutation, copied to the device pinned and non-blocking, so the host never waits for the device.
    """
    code = k + 4 * flip.long() + 8 * hflip.long()
    order = torch.argsort(code, stable=True)
    if x.device.type == "cuda":
        order = order.pin_memory()
    perm = order.to(x.device, non_blocking=True)
    sorted_x = x.index_select(0, perm)
    parts, start = [], 0
    for c, n in zip(*torch.unique(code, return_counts=True)):
        c, n = int(c), int(n)
        part = sorted_x.narrow(0, start, n)
        if c & 4:
            part = part.flip(-1)
        part = torch.rot90(part, c & 3, dims=(-2, -1))
        if c & 8:
            part = part.flip(-1)
        parts.append(part)
        start += n
    return torch.empty_like(x).index_copy_(0, perm, torch.cat(parts))


class DeviceAugment:
    """The exact rotations/flips of ``train.rotation``/``train.hflip`` on a batch already on the device.

    ``rot90`` draws quarter turns only (never a flip), ``d4`` also a flip: the draws of :class:`TrainTransform`.
    """

    def __init__(self, train: TrainConfig) -> None:
        self.rotation = train.rotation
        self.hflip = train.hflip
        self.generator = torch.Generator()

    def reseed(self, seed: int) -> None:
        """Start an epoch's draws (the trainer seeds from ``(train.seed, epoch)``)."""
        self.generator.manual_seed(seed)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quarter turns, flips and extra horizontal flips for ``n`` images (CPU tensors)."""
        g = self.generator
        turns = self.rotation in ("rot90", "d4")
        k = torch.randint(0, 4, (n,), generator=g) if turns else torch.zeros(n, dtype=torch.int64)
        flip = torch.rand(n, generator=g) < 0.5 if self.rotation == "d4" else torch.zeros(n, dtype=torch.bool)
        hflip = torch.rand(n, generator=g) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return k, flip, hflip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return d4_batch(x, *self.draw(len(x)))

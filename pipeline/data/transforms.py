"""Image preprocessing shared by training, evaluation and prediction.

Evaluation and prediction must see exactly the preprocessing the model was trained with, so both
take it from the checkpoint's config through :func:`eval_transform`. Training's augmentation
(``pipeline.learn.augment``) resizes with the same :func:`resize` and normalises with the same
:func:`normalize_batch`, so with augmentation off a training input equals the evaluation input bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(input_range: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for ``train.input_range``: ImageNet statistics, or [-1, 1] (the MobileViT galaxy recipe)."""
    if input_range == "minus_one_one":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if input_range == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"unknown input_range {input_range!r}")


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """HWC or NHWC uint8 -> contiguous NCHW uint8.

    Made contiguous while still uint8: a channels-last float batch makes every later elementwise op
    strided, which cost 4x the arithmetic itself in predict's preprocessing. numpy's transposing copy is
    2-4x faster than torch's for uint8 on one thread (what a loader worker has).
    """
    batch = images[None] if images.ndim == 3 else images
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def resize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """NCHW uint8 -> NCHW uint8 at ``img_size`` square: the one resize of training, evaluation and prediction.

    Area averaging when shrinking both sides, bilinear otherwise. The result is rounded back to uint8 because
    training augments uint8 images (RandAugment works on PIL images); evaluation rounds the same way, so both
    paths give the model the same pixels for the same image.
    """
    height, width = images.shape[-2:]
    if (height, width) == (img_size, img_size):
        return images
    shrink = height >= img_size and width >= img_size
    x = F.interpolate(
        images.float(), size=(img_size, img_size), mode="area" if shrink else "bilinear", align_corners=None if shrink else False
    )
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resize_image(image: np.ndarray, img_size: int) -> np.ndarray:
    """:func:`resize` for one HWC uint8 image (training's per-sample augmentation)."""
    return np.ascontiguousarray(resize(to_nchw(image), img_size)[0].permute(1, 2, 0).numpy())


def normalize_batch(images: torch.Tensor, input_range: str) -> torch.Tensor:
    """NCHW uint8 -> normalised float ``(x / 255 - mean) / std``: the last step of training's and evaluation's input."""
    mean, std = normalization(input_range)
    x = images.to(torch.float32, copy=True).div_(255.0)
    return x.sub_(torch.tensor(mean, device=x.device).view(1, 3, 1, 1)).div_(torch.tensor(std, device=x.device).view(1, 3, 1, 1))


def eval_transform(img_size: int, input_range: str) -> Callable[[np.ndarray], torch.Tensor]:
    """HWC uint8 image -> normalised CHW float tensor at ``img_size`` (:func:`resize`, no crop)."""
    batch = eval_batch_transform(img_size, input_range)
    return lambda image: batch([image])[0]


def eval_batch_transform(img_size: int, input_range: str) -> Callable[[Sequence[np.ndarray]], torch.Tensor]:
    """HWC uint8 images (any sizes) -> one normalised NCHW float batch at ``img_size``.

    Images of one shape are converted, resized and normalised as one tensor: per-image torch calls
    cost more than the arithmetic at cutout sizes. The result is element for element what
    :func:`eval_transform` gives each image alone.
    """
    normalization(input_range)  # an unknown range fails here, not at the first batch

    def prepare(images: Sequence[np.ndarray]) -> torch.Tensor:
        return normalize_batch(resize(to_nchw(np.stack(images)), img_size), input_range)

    def apply(images: Sequence[np.ndarray]) -> torch.Tensor:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        if len(groups) == 1:
            return prepare(images)
        out = torch.empty(len(images), 3, img_size, img_size)
        for rows in groups.values():
            out[rows] = prepare([images[i] for i in rows])
        return out

    return apply


def tta_group(rotation: str, hflip: bool) -> tuple[tuple[bool, int], ...]:
    """The (flip, quarter turns) pairs of the symmetry training taught the model (``train.rotation``, ``train.hflip``).

    Test-time augmentation averages exactly these views: ``rot90`` without ``hflip`` gives the 4 rotations (a mirror
    turns a clockwise spiral into an anticlockwise one); ``d4``, or any rotation with ``hflip``, the 8 of D4;
    ``none`` with ``hflip`` the image and its mirror; ``none`` alone only the image (TTA is then a no-op).
    """
    turns = (0,) if rotation == "none" else (0, 1, 2, 3)
    flips = (False, True) if hflip or rotation == "d4" else (False,)
    return tuple((flip, k) for flip in flips for k in turns)


def tta_views(x: torch.Tensor, group: Sequence[tuple[bool, int]]) -> list[torch.Tensor]:
    """The views of an NCHW batch under ``group`` (:func:`tta_group`): mirror if asked, then quarter turns."""
    views = []
    for flip, k in group:
        base = torch.flip(x, dims=(-1,)) if flip else x
        views.append(torch.rot90(base, k, dims=(-2, -1)))
    return views


"""Image preprocessing shared by training, evaluation and prediction.

Evaluation and prediction must see exactly the preprocessing the model was trained with, so both
take it from the checkpoint's config through :func:`eval_transform`.
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


def to_float_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC or NHWC uint8 -> contiguous NCHW float in [0, 1].

    Made contiguous while still uint8: a channels-last float batch makes every later elementwise op
    strided, which cost 4x the arithmetic itself in predict's preprocessing.
    """
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    return t.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def normalize_(x: torch.Tensor, input_range: str) -> torch.Tensor:
    """``(x - mean) / std`` in place on an NCHW float batch in [0, 1]: the one normalisation train and eval share."""
    mean, std = normalization(input_range)
    return x.sub_(torch.tensor(mean, device=x.device).view(1, 3, 1, 1)).div_(torch.tensor(std, device=x.device).view(1, 3, 1, 1))


def eval_transform(img_size: int, input_range: str) -> Callable[[np.ndarray], torch.Tensor]:
    """HWC uint8 image -> normalised CHW float tensor at ``img_size`` (area resize, no crop)."""
    batch = eval_batch_transform(img_size, input_range)
    return lambda image: batch([image])[0]


def eval_batch_transform(img_size: int, input_range: str) -> Callable[[Sequence[np.ndarray]], torch.Tensor]:
    """HWC uint8 images (any sizes) -> one normalised NCHW float batch at ``img_size``.

    Images of one shape are converted, resized and normalised as one tensor: per-image torch calls
    cost more than the arithmetic at cutout sizes. The result is element for element what
    :func:`eval_transform` gives each image alone.
    """
    normalization(input_range)  # an unknown range fails here, not at the first batch

    def resize(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (img_size, img_size):
            return x
        shrink = x.shape[-1] > img_size
        return F.interpolate(x, size=(img_size, img_size), mode="area" if shrink else "bilinear", align_corners=None if shrink else False)

    def apply(images: Sequence[np.ndarray]) -> torch.Tensor:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape, []).append(i)
        if len(groups) == 1:
            return normalize_(resize(to_float_tensor(np.stack(images))), input_range)
        out = torch.empty(len(images), 3, img_size, img_size)
        for rows in groups.values():
            out[rows] = normalize_(resize(to_float_tensor(np.stack([images[i] for i in rows]))), input_range)
        return out

    return apply


def d4_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 exact rotations/flips of an NCHW batch (test-time augmentation)."""
    views = []
    for flip in (False, True):
        base = torch.flip(x, dims=(-1,)) if flip else x
        for k in range(4):
            views.append(torch.rot90(base, k, dims=(-2, -1)))
    return views

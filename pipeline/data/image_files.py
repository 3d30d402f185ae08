"""Decoding JPEG/PNG cutout files into HWC uint8 RGB arrays, a batch at a time.

JPEGs go through TorchCodec's libjpeg-turbo decoder (one call per batch); Pillow spends more time
parsing JPEG headers in Python than libjpeg spends decoding a cutout, which made decoding the
slowest part of ``predict`` on an image folder (docs/catalog.md, "Decoding image files"). Both use
libjpeg-turbo with the same defaults, so the pixels are the same (tested). Pillow remains the
reference: it decodes PNGs, every file TorchCodec refuses, and everything when TorchCodec cannot be
loaded, and it words the per-image error, so a bad file gives the same reason either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG")
JPEG_MAGIC = b"\xff\xd8\xff"

Decoded = np.ndarray | BaseException


def read_image_file(path: str | Path) -> np.ndarray:
    """Decode a JPEG/PNG fully with Pillow (so a truncated file fails here) into an HWC uint8 RGB array.

    Only the JPEG and PNG decoders are tried: Pillow otherwise loads and probes every format plugin it has.
    """
    with Image.open(path, formats=IMAGE_FORMATS) as im:
        im.load()
        if im.mode != "RGB":
            bands = len(im.getbands())
            raise ValueError(f"image mode {im.mode} ({bands} band(s)), expected RGB (H, W, 3)")
        return np.asarray(im)


@functools.cache
def _torchcodec_jpeg() -> Callable[..., Any] | None:
    """TorchCodec's ``decode_jpeg``, or None when it is not installed or its library does not load."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # an ABI mismatch with the installed torch raises at import, not only ImportError
        return None
    return decode_jpeg


def fast_jpeg_available() -> bool:
    """Whether JPEGs are decoded by TorchCodec (else every file goes through Pillow)."""
    return _torchcodec_jpeg() is not None


def read_image_files(paths: Sequence[str | Path]) -> list[Decoded]:
    """Each file as an HWC uint8 RGB array, or the exception that says why it cannot be used.

    Never raises for a bad file. A batch TorchCodec cannot decode as a whole (one bad file fails the
    call) is retried file by file; a file it refuses or that is not 3-channel is left to Pillow.
    """
    out: list[Decoded | None] = [None] * len(paths)
    decode = _torchcodec_jpeg()
    if decode is not None:
        index, data = [], []
        for i, path in enumerate(paths):
            try:
                with open(path, "rb") as fh:  # not Path.read_bytes: its path parsing cost a third of a decode
                    if fh.read(len(JPEG_MAGIC)) == JPEG_MAGIC:  # anything else is Pillow's to read
                        fh.seek(0)
                        data.append(fh.read())
                        index.append(i)
            except OSError as exc:
                out[i] = exc
        for i, image in zip(index, _decode_jpegs(decode, data)):
            if image is not None and image.ndim == 3 and image.shape[0] == 3:
                out[i] = image.permute(1, 2, 0).numpy()
    for i, path in enumerate(paths):
        if out[i] is None:
            try:
                out[i] = read_image_file(path)
            except Exception as exc:  # any decoder failure is this file's problem only
                out[i] = exc
    return out  # type: ignore[return-value]


def _decode_jpegs(decode: Callable[..., Any], data: list[bytes]) -> list[Any]:
    if not data:
        return []
    try:
        return list(decode(data, mode="UNCHANGED"))
    except Exception:
        pass
    images: list[Any] = []
    for raw in data:
        try:
            images.append(decode(raw, mode="UNCHANGED"))
        except Exception:
            images.append(None)
    return images

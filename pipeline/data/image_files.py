"""Decoding cutout files (JPEG, PNG, FITS) into HWC uint8 RGB arrays under the pixel rule, a batch at a time.

JPEGs go through TorchCodec's libjpeg-turbo decoder (one call per batch); Pillow spends more time
parsing JPEG headers in Python than libjpeg spends decoding a cutout, which made decoding the
slowest part of ``predict`` on an image folder (docs/catalog.md, "Decoding image files"). Both use
libjpeg-turbo with the same defaults, so the pixels are the same (tested). Pillow remains the
reference: it decodes PNGs, every file TorchCodec refuses, and everything when TorchCodec cannot be
loaded, and it words the per-image error, so a bad file gives the same reason either way. Everything
but an RGB JPEG goes through :func:`pipeline.data.pixels.read_cutout`, the rule training uses too
(docs/pixels.md); a JPEG's size is read from its frame header before TorchCodec decodes it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PixelsConfig
from pipeline.data.pixels import check_size, read_cutout

JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (the frame header holds the size); C4, C8 and CC share the range but are not frames.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

Decoded = np.ndarray | BaseException


def read_image_file(path: str | Path, pixels: PixelsConfig | None = None) -> np.ndarray:
    """Decode a cutout file fully with Pillow or astropy under the pixel rule into an HWC uint8 RGB array."""
    return read_cutout(path, pixels or PixelsConfig())


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when its markers do not parse (Pillow then decides).

    A few byte comparisons: Pillow's ``open`` would cost more than TorchCodec's decode of a cutout.
    """
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if marker == 0xFF:  # a fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


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


def read_image_files(paths: Sequence[str | Path], pixels: PixelsConfig | None = None) -> list[Decoded]:
    """Each file as an HWC uint8 RGB array, or the exception that says why it cannot be used.

    Never raises for a bad file. A batch TorchCodec cannot decode as a whole (one bad file fails the
    call) is retried file by file; a file it refuses or that is not 3-channel is left to Pillow.
    """
    pixels = pixels or PixelsConfig()
    out: list[Decoded | None] = [None] * len(paths)
    decode = _torchcodec_jpeg()
    if decode is not None:
        index, data = [], []
        for i, path in enumerate(paths):
            try:
                with open(path, "rb") as fh:  # not Path.read_bytes: its path parsing cost a third of a decode
                    if fh.read(len(JPEG_MAGIC)) == JPEG_MAGIC:  # anything else is Pillow's to read
                        fh.seek(0)
                        raw = fh.read()
                        if (size := jpeg_size(raw)) is not None:
                            check_size(*size, pixels)
                        data.append(raw)
                        index.append(i)
            except (OSError, ValueError) as exc:
                out[i] = exc
        for i, image in zip(index, _decode_jpegs(decode, data)):
            if image is not None and image.ndim == 3 and image.shape[0] == 3:
                out[i] = image.permute(1, 2, 0).numpy()
    for i, path in enumerate(paths):
        if out[i] is None:
            try:
                out[i] = read_cutout(path, pixels)
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

"""The one pixel rule: how a cutout file becomes the (H, W, 3) uint8 RGB array the model sees.

``docs/pixels.md`` states the rule; this module is its only implementation. The folder source
(training) and predict's image-file inputs both call :func:`read_cutout`, so one file gives the same
pixels in training and in prediction, and a file the rule refuses is refused by both with the same
one-line reason. The size cap is checked from the header (Pillow's lazy ``open``, the FITS ``NAXISn``
keywords) before any pixel is decoded, so memory is bounded by configuration, not by the input.
:class:`Geometry` is the centre crop and resize after the rule, the one of ``prepare`` (every source) and of
predict's raw inputs (the model's).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.visualization import AsinhStretch, LinearStretch, ManualInterval, PercentileInterval, make_lupton_rgb, make_rgb
from PIL import Image

from pipeline.config import PixelsConfig

IMAGE_FORMATS = ("JPEG", "PNG")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
CUTOUT_SUFFIXES = IMAGE_SUFFIXES + FITS_SUFFIXES
KEY = "data.folder.pixels"


class PixelError(ValueError):
    """Why one file's pixels cannot be used, in one line (callers prefix the file name)."""


def is_fits(path: str | Path) -> bool:
    return str(path).lower().endswith(FITS_SUFFIXES)


def split_suffix(name: str) -> tuple[str, str]:
    """``(stem, suffix)`` of a cutout file name, the suffix being the longest known one (``a.fits.gz`` -> ``a``)."""
    lower = name.lower()
    suffix = max((s for s in CUTOUT_SUFFIXES if lower.endswith(s)), key=len, default="")
    return name[: len(name) - len(suffix)], name[len(name) - len(suffix) :]


def check_size(width: int, height: int, cfg: PixelsConfig) -> None:
    """Refuse an image over ``max_pixels`` before it is decoded."""
    if width * height > cfg.max_pixels:
        raise PixelError(f"image is {width}x{height} = {width * height:,} pixels, over {KEY}.max_pixels={cfg.max_pixels:,}")


def read_cutout(path: str | Path, cfg: PixelsConfig) -> np.ndarray:
    """The file's pixels under the rule; raises :class:`PixelError` (or ``OSError``) for a file the rule refuses."""
    return read_fits(Path(path), cfg) if is_fits(path) else read_image(path, cfg)


# ------------------------------------------------------------------ JPEG and PNG


def read_image(path: str | Path, cfg: PixelsConfig) -> np.ndarray:
    """A JPEG/PNG file, size-checked from its header, fully decoded (a truncated file fails here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below is ours, and stricter
        try:
            im = Image.open(path, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise PixelError(f"over Pillow's own size limit ({exc})") from None
    with im:
        check_size(*im.size, cfg)
        im.load()
        return image_to_rgb8(im)


def image_to_rgb8(im: Image.Image) -> np.ndarray:
    """Palette expanded, opaque alpha dropped, 16-bit scaled by its range, gray replicated; anything else refused."""
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode == "1":
        im = im.convert("L")
    mode = im.mode
    if mode in ("RGB", "L"):
        arr = np.asarray(im)
    elif mode in ("RGBA", "LA"):
        arr = drop_opaque_alpha(np.asarray(im), mode)
    elif mode == "I" or mode.startswith("I;16"):
        arr = scale_to_uint8(np.asarray(im), bits=16)
    else:
        raise PixelError(f"image mode {mode} ({len(im.getbands())} band(s)) is not supported; expected RGB or gray, 8 or 16 bits")
    return gray_to_rgb(arr)


def drop_opaque_alpha(arr: np.ndarray, mode: str) -> np.ndarray:
    """The colour bands of an image whose alpha is 255 everywhere; transparency would need a guessed background."""
    if (arr[..., -1] != 255).any():
        raise PixelError(f"image mode {mode} has transparent pixels; flatten it onto the sky background first")
    return arr[..., :-1]


def scale_to_uint8(arr: np.ndarray, *, bits: int) -> np.ndarray:
    """The top 8 of ``bits`` bits (v >> (bits - 8)): the dtype range maps onto 0-255, as Pillow does for 16-bit RGB PNGs."""
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << bits):
        raise PixelError(f"pixel values {arr.min()}..{arr.max()} outside the {bits}-bit range")
    return (arr >> (bits - 8)).astype(np.uint8)


def gray_to_rgb(arr: np.ndarray) -> np.ndarray:
    """One band replicated into R, G and B (a single-band FITS image takes the same path)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


# ------------------------------------------------------------------ FITS


def fits_band_paths(path: Path, cfg: PixelsConfig) -> list[Path]:
    """The files of one FITS cutout: the file itself, or with ``fits_band_files`` the band set its name starts."""
    if not cfg.fits_band_files:
        return [path]
    stem, suffix = split_suffix(path.name)
    first = cfg.fits_band_files[0]
    if not stem.endswith(first):
        raise PixelError(f"name does not end with the first band's ending {first!r} ({KEY}.fits_band_files)")
    base = stem[: len(stem) - len(first)]
    return [path.with_name(base + end + suffix) for end in cfg.fits_band_files]


def _image_hdu(hdul: fits.HDUList) -> tuple[fits.hdu.base.ExtensionHDU, tuple[int, ...]]:
    """The first image HDU with two or more axes, and its shape in numpy order, from the header alone."""
    for hdu in hdul:
        naxis = int(hdu.header.get("NAXIS", 0))
        if hdu.is_image and naxis >= 2:
            return hdu, tuple(int(hdu.header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    raise PixelError("no image HDU with two or more axes")


def _planes(hdu: fits.hdu.base.ExtensionHDU, shape: tuple[int, ...]) -> list[tuple[fits.hdu.base.ExtensionHDU, tuple[int, ...]]]:
    """One ``(hdu, index)`` per band: a 2-D image is one band, a cube one per plane (length-1 axes ignored)."""
    extra = shape[:-2]
    long_axes = [d for d in extra if d != 1]
    if len(long_axes) > 1:
        raise PixelError(f"image of shape {shape}: expected one 2-D image or one cube of bands")
    count = long_axes[0] if long_axes else 1
    return [(hdu, tuple(k if d != 1 else 0 for d in extra)) for k in range(count)]


def read_fits(path: Path, cfg: PixelsConfig) -> np.ndarray:
    """A single-band image, a band cube, or a per-band file set mapped to RGB by ``fits_bands`` and the stretch.

    Only the three chosen planes are read (``hdu.section``), each after the header passed the size cap.
    """
    files = fits_band_paths(path, cfg)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", AstropyWarning)  # header repairs and truncation notes: the read decides
        planes = []
        for file in files:
            hdul = stack.enter_context(fits.open(file, memmap=False, lazy_load_hdus=True))
            hdu, shape = _image_hdu(hdul)
            check_size(shape[-1], shape[-2], cfg)
            found = _planes(hdu, shape)
            if len(files) > 1 and len(found) > 1:
                raise PixelError(f"{file.name}: a per-band file holds {len(found)} bands, expected one 2-D image")
            planes += found
        if len({hdu.header["NAXIS1"] for hdu, _ in planes}) > 1 or len({hdu.header["NAXIS2"] for hdu, _ in planes}) > 1:
            raise PixelError("band images differ in size")
        if len(planes) > 1 and max(cfg.fits_bands) >= len(planes):
            raise PixelError(f"has {len(planes)} bands; {KEY}.fits_bands={cfg.fits_bands} needs band {max(cfg.fits_bands)}")
        chosen = [planes[0]] * 3 if len(planes) == 1 else [planes[i] for i in cfg.fits_bands]
        bands = [np.asarray(hdu.section[index + (slice(None), slice(None))], dtype=np.float32) for hdu, index in chosen]
    return bands_to_rgb8(bands, cfg)[::-1].copy()  # FITS stores the bottom row first: north up, as in JPEG cutouts


def bands_to_rgb8(bands: list[np.ndarray], cfg: PixelsConfig) -> np.ndarray:
    """Red, green and blue flux images -> uint8 RGB, one interval for all three bands so colours keep their ratios.

    Non-finite pixels (masked or blank) become the interval's low end, black.
    """
    stack = np.stack(bands)
    finite = np.isfinite(stack)
    if not finite.any():
        raise PixelError("no finite pixel value")
    if cfg.fits_stretch == "lupton":
        stack[~finite] = cfg.fits_lupton_minimum
        with np.errstate(divide="ignore", invalid="ignore"):  # astropy divides where the intensity is 0, then discards it
            return make_lupton_rgb(*stack, minimum=cfg.fits_lupton_minimum, stretch=cfg.fits_lupton_stretch, Q=cfg.fits_lupton_q)
    low, high = PercentileInterval(cfg.fits_percentile).get_limits(stack[finite])
    stack[~finite] = low
    high = high if high > low else low + 1  # a constant image: black, not a division by zero
    stretch = AsinhStretch(cfg.fits_asinh_a) if cfg.fits_stretch == "asinh" else LinearStretch()
    return make_rgb(*stack, interval=ManualInterval(low, high), stretch=stretch)


# ------------------------------------------------------------------ crop and resize


@dataclass(frozen=True)
class Geometry:
    """``data.center_crop`` and ``data.resize``: the one crop and resize of ``prepare`` and of predict's raw inputs.

    A model trained on cropped images must see the same crop when it classifies raw files, so ``prepare`` (every
    source) and predict's image-file and HDF5 inputs both call :meth:`apply` with the training config's values.
    """

    center_crop: float | None = None
    resize: int | None = None

    @classmethod
    def of(cls, data: Any) -> Geometry:
        """The geometry of a ``DataConfig``."""
        return cls(data.center_crop, data.resize)

    def __bool__(self) -> bool:
        return self.center_crop is not None or self.resize is not None

    def crop_box(self, height: int, width: int) -> tuple[int, int, int]:
        """(top, left, side) of the central square, ``center_crop`` of the shorter side (the whole image if None)."""
        if self.center_crop is None:
            return 0, 0, min(height, width)
        side = max(1, round(self.center_crop * min(height, width)))
        return (height - side) // 2, (width - side) // 2, side

    def shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The (H, W, C) that :meth:`apply` makes of an image of ``shape``."""
        height, width, channels = (int(s) for s in shape)
        if self.resize is not None:
            return self.resize, self.resize, channels
        if self.center_crop is None:
            return height, width, channels
        side = self.crop_box(height, width)[2]
        return side, side, channels

    def apply(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 -> its central square (``center_crop``), then ``resize`` square (Lanczos); unchanged if both are None."""
        if self.center_crop is not None:
            top, left, side = self.crop_box(*image.shape[:2])
            image = image[top : top + side, left : left + side]
        if self.resize is not None and image.shape[:2] != (self.resize, self.resize):
            with Image.fromarray(np.ascontiguousarray(image)) as im:
                image = np.asarray(im.resize((self.resize, self.resize), Image.Resampling.LANCZOS))
        return np.ascontiguousarray(image)

    def apply_batch(self, images: np.ndarray) -> np.ndarray:
        """:meth:`apply` on each image of an NHWC batch (the same call, so every source gets the same pixels)."""
        if not self:
            return images
        return np.stack([self.apply(image) for image in images]) if len(images) else images

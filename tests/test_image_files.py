"""Image-file decoding: TorchCodec's JPEG path gives Pillow's pixels and Pillow's errors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.data import image_files
from pipeline.config import PixelsConfig
from pipeline.data.image_files import fast_jpeg_available, jpeg_size, read_image_file, read_image_files
from pipeline.data.pixels import PixelError


def galaxy(seed: int, size: int = 64) -> np.ndarray:
    """A smooth blob on noise: JPEG-like content with real chroma, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    blob = np.exp(-(xx**2 + (yy * rng.uniform(1, 3)) ** 2) * 30)[..., None] * rng.uniform(80, 255, 3)
    return np.clip(blob + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture()
def pile(tmp_path: Path) -> dict[str, Path]:
    """Good files of every flavour predict meets, and bad ones, each named for what it is."""
    files: dict[str, bytes] = {
        "baseline.jpg": jpeg_bytes(galaxy(0), quality=95),
        "q75_444.jpg": jpeg_bytes(galaxy(1, 80), quality=75, subsampling=0),
        "progressive.jpg": jpeg_bytes(galaxy(2), quality=90, progressive=True),
        "trailing_bytes.jpg": jpeg_bytes(galaxy(3)) + b"junk after EOI",
        "gray.jpg": jpeg_bytes(galaxy(4)[..., 0]),
        "truncated.jpg": jpeg_bytes(galaxy(6))[:400],
        "garbage.jpg": b"\xff\xd8\xff\xe0 not a JPEG at all" * 20,
        "empty.jpg": b"",
    }
    buf = io.BytesIO()
    Image.fromarray(galaxy(5)).convert("CMYK").save(buf, format="JPEG")
    files["cmyk.jpg"] = buf.getvalue()
    png = io.BytesIO()
    Image.fromarray(galaxy(7)).save(png, format="PNG")
    files["png_named.jpg"] = png.getvalue()  # a PNG behind a .jpg suffix: Pillow still reads it
    files["image.png"] = png.getvalue()
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["missing.jpg"] = tmp_path / "missing.jpg"
    return paths


def pillow_outcome(path: Path) -> np.ndarray | str:
    try:
        return read_image_file(path)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def outcome(result: np.ndarray | BaseException) -> np.ndarray | str:
    return result if isinstance(result, np.ndarray) else f"{type(result).__name__}: {result}"


def assert_same(got: list[np.ndarray | BaseException], paths: list[Path]) -> None:
    for path, result in zip(paths, got, strict=True):
        want, have = pillow_outcome(path), outcome(result)
        if isinstance(want, str):
            assert have == want, path.name
        else:
            assert isinstance(have, np.ndarray), f"{path.name}: {have}"
            assert have.shape == want.shape and have.dtype == np.uint8
            np.testing.assert_array_equal(have, want, err_msg=path.name)


def test_torchcodec_is_the_jpeg_decoder_here() -> None:
    """A dependency that stopped loading would silently fall back to Pillow and lose the speed."""
    assert fast_jpeg_available()


def test_every_file_decodes_to_pillows_pixels_or_pillows_error(pile: dict[str, Path]) -> None:
    paths = list(pile.values())
    assert_same(read_image_files(paths), paths)
    good = {p.name for p, r in zip(paths, read_image_files(paths)) if isinstance(r, np.ndarray)}
    assert good == {"baseline.jpg", "q75_444.jpg", "progressive.jpg", "trailing_bytes.jpg", "png_named.jpg", "image.png", "gray.jpg"}


def test_a_batch_of_only_good_jpegs_takes_one_decoder_call(pile: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    decode = image_files._torchcodec_jpeg()
    calls: list[int] = []

    def counting(data: Any, **kw: Any) -> Any:
        calls.append(len(data) if isinstance(data, list) else 1)
        return decode(data, **kw)

    monkeypatch.setattr(image_files, "_torchcodec_jpeg", lambda: counting)
    paths = [pile[n] for n in ("baseline.jpg", "progressive.jpg", "q75_444.jpg")]
    assert_same(read_image_files(paths), paths)
    assert calls == [3]
    calls.clear()
    paths.insert(1, pile["truncated.jpg"])  # one bad file fails the batch call: the rest are decoded one by one
    assert_same(read_image_files(paths), paths)
    assert calls == [4, 1, 1, 1, 1]


def test_without_torchcodec_pillow_gives_the_same_results(pile: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    paths = list(pile.values())
    fast = [outcome(r) for r in read_image_files(paths)]
    monkeypatch.setattr(image_files, "_torchcodec_jpeg", lambda: None)
    slow = [outcome(r) for r in read_image_files(paths)]
    for path, a, b in zip(paths, fast, slow, strict=True):
        assert type(a) is type(b), path.name
        if isinstance(a, str):
            assert a == b, path.name
        else:
            np.testing.assert_array_equal(a, b, err_msg=path.name)


def test_a_jpeg_over_the_pixel_cap_is_refused_from_its_frame_header(pile: dict[str, Path]) -> None:
    """TorchCodec would decode any size: the cap is read from the JPEG header first, where Pillow reads it too."""
    for name in ("baseline.jpg", "q75_444.jpg", "progressive.jpg", "gray.jpg", "cmyk.jpg"):
        with Image.open(pile[name]) as im:
            assert jpeg_size(pile[name].read_bytes()) == im.size, name
    small = PixelsConfig(max_pixels=64 * 64 - 1)
    refused = read_image_files([pile["baseline.jpg"], pile["image.png"]], small)
    assert all(isinstance(r, PixelError) and "64x64 = 4,096 pixels" in str(r) for r in refused)

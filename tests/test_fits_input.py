"""FITS cutouts (one 2-D image, a band cube, one file per band) in predict and the folder source (issue 13 item 2).

The files are written by astropy; the expected pixels follow docs/pixels.md: bands chosen by
``data.folder.pixels.fits_bands``, one asinh interval over all three bands, north up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.visualization import AsinhStretch, ManualInterval, make_lupton_rgb, make_rgb
from PIL import Image

from conftest import make_checkpoint
from pipeline.catalog import parquet as C
from pipeline.catalog.inputs import iter_chunks, open_input
from pipeline.config import GALAXY10_CLASS_NAMES, PixelsConfig
from pipeline.data.pixels import PixelError, read_cutout

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
BANDS = ("_g", "_r", "_z")


def cube(seed: int, bands: int = 3) -> np.ndarray:
    """(bands, SIZE, SIZE) float32 fluxes: a galaxy brighter in redder bands on sky noise, one masked (NaN) pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    blob = np.exp(-((xx - 0.1) ** 2 + (yy * 2) ** 2) * 25)
    data = np.stack([blob * (20 + 15 * k) + rng.normal(0, 1, (SIZE, SIZE)) for k in range(bands)]).astype(np.float32)
    data[:, 3, 5] = np.nan
    return data


def expected(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The documented default: central 99.5 % of all three bands, asinh(a=0.1), NaN black, bottom FITS row last."""
    stack = np.stack([r, g, b]).astype(np.float32)
    low, high = np.percentile(stack[np.isfinite(stack)], [0.25, 99.75])
    stack[~np.isfinite(stack)] = low
    return make_rgb(*stack, interval=ManualInterval(low, high), stretch=AsinhStretch(0.1))[::-1]


def write_fits(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data).writeto(path)
    return path


def write_band_files(folder: Path, name: str, data: np.ndarray) -> Path:
    """One 2-D file per band, ``name_g.fits`` ...; returns the first band's file, which names the cutout."""
    for band, plane in zip(BANDS, data):
        write_fits(folder / f"{name}{band}.fits", plane)
    return folder / f"{name}{BANDS[0]}.fits"


def test_the_band_mapping_follows_the_config(tmp_path: Path) -> None:
    g, r, z = data = cube(0)
    path = write_fits(tmp_path / "cube.fits", data)
    np.testing.assert_array_equal(read_cutout(path, PixelsConfig()), expected(z, r, g))
    np.testing.assert_array_equal(read_cutout(path, PixelsConfig(fits_bands=[0, 1, 2])), expected(g, r, z))
    lupton = PixelsConfig(fits_stretch="lupton", fits_lupton_stretch=20, fits_lupton_q=4)
    clean = np.nan_to_num(data, nan=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = make_lupton_rgb(clean[2], clean[1], clean[0], minimum=0, stretch=20, Q=4)[::-1]
    np.testing.assert_array_equal(read_cutout(path, lupton), want)
    single = read_cutout(write_fits(tmp_path / "single.fits", r), PixelsConfig())
    np.testing.assert_array_equal(single, expected(r, r, r))  # one band is gray: replicated, as for a gray PNG
    lit = np.zeros((SIZE, SIZE), np.float32)
    lit[0, 0] = 1  # FITS pixel (1, 1): the bottom-left corner
    assert read_cutout(write_fits(tmp_path / "corner.fits", lit), PixelsConfig())[SIZE - 1, 0, 0] == 255


def test_fits_files_the_rule_refuses_say_why_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(PixelError, match=r"has 2 bands; data.folder.pixels.fits_bands=\[2, 1, 0\] needs band 2"):
        read_cutout(write_fits(tmp_path / "two.fits", cube(0, bands=2)), PixelsConfig())
    header = fits.Header([("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", 50000), ("NAXIS2", 50000)])
    (tmp_path / "huge.fits").write_bytes(header.tostring().encode() + bytes(2880))  # claims 10 GB, holds 2.9 KB
    with pytest.raises(PixelError, match="50000x50000 = 2,500,000,000 pixels, over data.folder.pixels.max_pixels"):
        read_cutout(tmp_path / "huge.fits", PixelsConfig())
    with pytest.raises(PixelError, match="no finite pixel"):
        read_cutout(write_fits(tmp_path / "blank.fits", np.full((SIZE, SIZE), np.nan, np.float32)), PixelsConfig())


@pytest.mark.slow
def test_fits_cutouts_round_trip_through_predict(tmp_path: Path) -> None:
    """A single-band image and a cube are classified like PNGs holding the pixels the rule gives them."""
    ckpt = make_checkpoint(tmp_path / "best.pt", "astroformer_pico", img_size=SIZE)
    folder = tmp_path / "cutouts"
    g, r, z = data = cube(1)
    write_fits(folder / "cube.fits", data)
    write_fits(folder / "deep" / "single.fits.gz", r)
    Image.fromarray(expected(z, r, g)).save(folder / "cube_as_png.png")
    Image.fromarray(expected(r, r, r)).save(folder / "single_as_png.png")
    out = tmp_path / "cat"
    args = ["predict", "-q", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--set", "predict.device=cpu", "--set", "predict.workers=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = C.read_predictions(out).set_index("id")
    assert sorted(df.index) == ["cube", "cube_as_png", "deep/single", "single_as_png"]
    probs = C.prob_columns(GALAXY10_CLASS_NAMES)
    np.testing.assert_allclose(df.loc["cube", probs].to_numpy(float), df.loc["cube_as_png", probs].to_numpy(float), rtol=1e-5)
    np.testing.assert_allclose(df.loc["deep/single", probs].to_numpy(float), df.loc["single_as_png", probs].to_numpy(float), rtol=1e-5)


def test_per_band_files_are_one_cutout_for_predict_and_for_training(tmp_path: Path) -> None:
    folder = tmp_path / "bands"
    cubes = {name: cube(seed) for seed, name in enumerate(("obj1", "obj2"))}
    firsts = {name: write_band_files(folder, name, data) for name, data in cubes.items()}
    write_fits(folder / "obj3_g.fits", cube(3)[0])  # its r and z files are missing
    pixels = PixelsConfig(fits_band_files=list(BANDS))

    records = [r for chunk in iter_chunks(open_input(folder, pixels=pixels), 8) for r in chunk.records]
    assert [r.id for r in records] == ["obj1", "obj2", "obj3"]
    for rec, data in zip(records, cubes.values()):
        np.testing.assert_array_equal(rec.image, expected(data[2], data[1], data[0]))
    assert records[2].image is None and "obj3_r.fits" in records[2].error

    (folder / "labels.csv").write_text("id,label,path\n" + "".join(f"{n},{i},{p.name}\n" for i, (n, p) in enumerate(firsts.items())))
    workdir = tmp_path / "w"
    args = ["prepare", "-q", "--workdir", str(workdir), "--set", "data.source=folder", "--set", f"data.path={folder}",
            "--set", "data.folder.pixels.fits_band_files=[_g,_r,_z]"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(workdir / "data/prepared/dataset.h5", "r") as f:
        trained = f["images"][:]
    for image, rec in zip(trained, records[:2]):
        np.testing.assert_array_equal(image, rec.image)

"""The pixel rule (docs/pixels.md) in training and prediction alike, the pixel cap, bad folder entries, a BOM CSV.

Issue 14 items 5, 6, 7 and the byte-order-mark part of item 10, driven through the CLI in subprocesses.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import make_checkpoint
from pipeline.catalog import parquet as C
from pipeline.catalog.inputs import iter_chunks, open_input
from pipeline.data.image_files import read_image_files

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def write_folder(root: Path, images: dict[str, Image.Image], *, bom: bool = False) -> Path:
    """``images`` saved under ``root`` (format from the suffix) with a labels CSV listing them in order."""
    root.mkdir(parents=True, exist_ok=True)
    for name, im in images.items():
        im.save(root / name)
    lines = ["id,label,path"] + [f"{n.replace('.', '_')},{i % 10},{n}" for i, n in enumerate(images)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig" if bom else "utf-8")
    return root


def prepare(workdir: Path, folder: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = ["prepare", "-q", "--workdir", str(workdir), "--set", "data.source=folder", "--set", f"data.path={folder}"]
    return cli(*args, *(a for s in sets for a in ("--set", s)))


def prepared_images(workdir: Path) -> np.ndarray:
    with h5py.File(workdir / "data/prepared/dataset.h5", "r") as f:
        return f["images"][:]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def smooth(seed: int, mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    blob = np.exp(-(xx**2 + yy**2) * 20)
    bands = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
    img = blob[..., None] * rng.uniform(0.5, 1, bands) + rng.uniform(0, 0.1, (SIZE, SIZE, bands))
    return img.squeeze()


def pile() -> dict[str, Image.Image]:
    """One file per case of the rule: 16-bit gray, gray, opaque alpha, palette, 1-bit, and plain RGB PNG and JPEG."""
    rgba = (smooth(3, "RGBA") * 255).astype(np.uint8)
    rgba[..., 3] = 255
    la = (smooth(4, "LA") * 255).astype(np.uint8)
    la[..., 1] = 255
    return {
        "deep.png": Image.fromarray((smooth(0, "L") * 60000).astype(np.uint16)),
        "gray.png": Image.fromarray((smooth(1, "L") * 255).astype(np.uint8)),
        "rgb.png": Image.fromarray((smooth(2) * 255).astype(np.uint8)),
        "rgba.png": Image.fromarray(rgba),
        "la.png": Image.fromarray(la, mode="LA"),
        "palette.png": Image.fromarray((smooth(5) * 255).astype(np.uint8)).quantize(16),
        "bilevel.png": Image.fromarray(smooth(6, "L") > 0.5),
        "rgb.jpg": Image.fromarray((smooth(7) * 255).astype(np.uint8)),
        "gray.jpg": Image.fromarray((smooth(8, "L") * 255).astype(np.uint8)),
    }


# ------------------------------------------------------------------ item 7: one rule for training and predict


def test_training_and_predict_see_the_same_pixels_under_one_rule(tmp_path: Path) -> None:
    files = pile()
    folder = write_folder(tmp_path / "cutouts", files)
    proc = prepare(tmp_path / "w", folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = prepared_images(tmp_path / "w")
    predicted = read_image_files([folder / name for name in files])
    for name, train_px, predict_px in zip(files, trained, predicted, strict=True):
        assert isinstance(predict_px, np.ndarray), f"{name}: predict refused it: {predict_px}"
        np.testing.assert_array_equal(train_px, predict_px, err_msg=name)
    deep = np.asarray(files["deep.png"])
    np.testing.assert_array_equal(trained[0], np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert (trained[0] == 255).mean() < 0.01  # the old convert("RGB") clipped 16-bit values: 99 % white
    gray = trained[list(files).index("gray.png")]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_transparent_pixels_stop_prepare_with_one_line(tmp_path: Path) -> None:
    rgba = (smooth(3, "RGBA") * 255).astype(np.uint8)
    rgba[:4, :4, 3] = 0
    folder = write_folder(tmp_path / "cutouts", {"ok.png": Image.fromarray((smooth(1) * 255).astype(np.uint8)), "holes.png": Image.fromarray(rgba)})
    err = one_line_error(prepare(tmp_path / "w", folder))
    assert "holes.png" in err and "transparent" in err


def test_prepare_reads_a_labels_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cutouts", {f"g{i}.png": Image.fromarray((smooth(i) * 255).astype(np.uint8)) for i in range(3)}, bom=True)
    assert (folder / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    proc = prepare(tmp_path / "w", folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert prepared_images(tmp_path / "w").shape == (3, SIZE, SIZE, 3)


# ------------------------------------------------------------------ item 5: a pixel cap checked from the header


def test_an_image_over_max_pixels_stops_prepare_with_one_line(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cutouts", {"g.png": Image.fromarray((smooth(0) * 255).astype(np.uint8))})
    err = one_line_error(prepare(tmp_path / "w", folder, f"data.folder.pixels.max_pixels={SIZE * SIZE - 1}"))
    assert "g.png" in err and f"{SIZE}x{SIZE}" in err and "data.folder.pixels.max_pixels=1,023" in err


def write_black_png(path: Path, side: int) -> None:
    """A ``side`` x ``side`` black RGB PNG written row by row: a few hundred KB on disk, never whole in memory here."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    deflate = zlib.compressobj(6)
    row = bytes(1 + 3 * side)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def predict_peak_mb(ckpt: Path, folder: Path, out: Path) -> tuple[float, str]:
    """Peak resident memory of one ``predict`` subprocess (in-process decoding), and its output."""
    args = ["-m", "pipeline.cli", "predict", "-q", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out)]
    for s in ("predict.device=cpu", "predict.workers=0", "predict.batch_size=4", "predict.threads=1"):
        args += ["--set", s]
    proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, *args], capture_output=True, text=True, timeout=600)
    peak = re.search(r"peak_kb (\d+)", proc.stdout)
    assert peak, proc.stdout + proc.stderr
    return int(peak.group(1)) / 1024, proc.stdout + proc.stderr


@pytest.mark.slow
def test_predict_memory_is_bounded_by_max_pixels_not_by_the_input(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt", "astroformer_pico", img_size=SIZE)
    small, big = tmp_path / "small", tmp_path / "big"
    for folder in (small, big):
        folder.mkdir()
        for i in range(2):
            Image.fromarray((smooth(i) * 255).astype(np.uint8)).save(folder / f"g{i}.png")
    write_black_png(big / "huge0.png", 12000)
    os.link(big / "huge0.png", big / "huge1.png")
    base_mb, _ = predict_peak_mb(ckpt, small, tmp_path / "cat_small")
    peak_mb, output = predict_peak_mb(ckpt, big, tmp_path / "cat_big")
    assert peak_mb - base_mb < 150, f"peak {peak_mb:.0f} MB vs {base_mb:.0f} MB without the two 12000x12000 PNGs\n{output[-2000:]}"
    errors = C.read_errors(tmp_path / "cat_big").set_index("id")
    assert set(errors.index) == {"huge0", "huge1"}
    assert errors["reason"].str.contains("12000x12000 = 144,000,000 pixels, over data.folder.pixels.max_pixels").all()


# ------------------------------------------------------------------ item 6: one bad entry does not abort a folder


@pytest.mark.slow
def test_dangling_links_and_link_loops_in_a_predict_folder_become_error_rows(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "best.pt", "astroformer_pico", img_size=SIZE)
    folder = tmp_path / "pile"
    (folder / "sub").mkdir(parents=True)
    for i, where in enumerate(("", "sub/")):
        Image.fromarray((smooth(i) * 255).astype(np.uint8)).save(folder / f"{where}g{i}.png")
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "cat"
    proc = cli("predict", "-q", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out), "--set", "predict.device=cpu", "--set", "predict.workers=0")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = C.read_errors(out).set_index("id")
    assert set(errors.index) == {"gone", "sub/loop"}
    assert "No such file" in errors.loc["gone", "reason"] and "already listed" in errors.loc["sub/loop", "reason"]
    assert sorted(C.read_predictions(out)["id"]) == ["g0", "sub/g1"]


def test_an_unreadable_subdirectory_is_an_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission bits do not stop root (these tests may run as root), so the refusal is the OS call's."""
    for where in ("", "locked/"):
        (tmp_path / where).mkdir(exist_ok=True)
        Image.fromarray((smooth(0) * 255).astype(np.uint8)).save(tmp_path / where / "g.png")
    scandir = os.scandir

    def refusing(path: str) -> object:
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    records = [r for chunk in iter_chunks(open_input(tmp_path), 8) for r in chunk.records]
    assert [(r.id, r.error is None) for r in records] == [("g", True), ("locked", False)]
    assert "unreadable directory" in records[1].error and "Permission denied" in records[1].error

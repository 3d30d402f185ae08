"""Sources: schema checks with clear errors, folder catalogs, the Galaxy10 download, bounded memory."""

from __future__ import annotations

import csv
import hashlib
import http.server
import threading
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import make_galaxy10_h5
from pipeline.config import load_config
from pipeline.errors import DataError
from pipeline.layout import Layout
from pipeline.data.prepare import DATASET_FILE, PreparedDataset, prepare
from pipeline.data.sources.galaxy10 import download, ensure_galaxy10


def _prepare_h5(path: Path, out: Path, *extra: str):
    cfg = load_config(None, ["data.source=h5", f"data.path={path}", *extra])
    return prepare(cfg, out, progress=False)


def test_h5_source_round_trip(tmp_path, galaxy10_h5):
    path, data = galaxy10_h5
    summary = _prepare_h5(path, tmp_path / "prep")
    ds = PreparedDataset(tmp_path / "prep" / DATASET_FILE)
    assert summary["num_images"] == len(ds) == 60
    batches = list(ds.iter_batches(7))
    images = np.concatenate([b.images for b in batches])
    assert np.array_equal(images, data["images"])
    assert np.array_equal(np.concatenate([b.labels for b in batches]), data["ans"])
    assert np.allclose(np.concatenate([b.ra for b in batches]), data["ra"])
    assert ds.class_names[0] == "Disturbed" and ds.data_hash == summary["data_hash"]


def test_same_content_same_hash_and_missing_coords_are_nan(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    make_galaxy10_h5(a, with_coords=False)
    make_galaxy10_h5(b, with_coords=False, compression="gzip")
    sa = _prepare_h5(a, tmp_path / "pa")
    sb = _prepare_h5(b, tmp_path / "pb")
    assert sa["data_hash"] == sb["data_hash"]
    ds = PreparedDataset(tmp_path / "pa" / DATASET_FILE)
    assert np.isnan(ds.read_column("ra")).all()


def _bad_h5(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.h5"
    if kind == "not_hdf5":
        path.write_text("this is a CSV, not HDF5\n1,2,3\n")
    elif kind == "truncated":
        make_galaxy10_h5(tmp_path / "full.h5", n=40)
        data = (tmp_path / "full.h5").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "missing_images":
        with h5py.File(path, "w") as h5:
            h5["ans"] = np.zeros(5, np.uint8)
    elif kind == "mismatched_lengths":
        with h5py.File(path, "w") as h5:
            h5["images"] = np.zeros((5, 8, 8, 3), np.uint8)
            h5["ans"] = np.zeros(4, np.uint8)
    elif kind == "labels_out_of_range":
        make_galaxy10_h5(path, n=20)
        with h5py.File(path, "a") as h5:
            h5["ans"][3] = 12
    elif kind == "wrong_image_shape":
        with h5py.File(path, "w") as h5:
            h5["images"] = np.zeros((5, 8, 8), np.uint8)
            h5["ans"] = np.zeros(5, np.uint8)
    return path


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("not_hdf5", r"not a readable HDF5 file"),
        ("truncated", r"(not a readable HDF5 file|cannot be read)"),
        ("missing_images", r"missing dataset\(s\) \['images'\]"),
        ("mismatched_lengths", r"field 'ans' must have shape \(5,\)"),
        ("labels_out_of_range", r"label must be in \[0, 10\).*row 3 has 12"),
        ("wrong_image_shape", r"field 'images' must have shape \(N, H, W, 3\)"),
    ],
)
def test_bad_h5_inputs_fail_clearly_and_write_nothing(tmp_path, kind, pattern):
    path = _bad_h5(tmp_path, kind)
    out = tmp_path / "prep"
    with pytest.raises(DataError, match=pattern) as err:
        _prepare_h5(path, out)
    assert str(path) in str(err.value)
    assert not (out / DATASET_FILE).exists()
    assert not [p for p in out.glob("*") if p.name.endswith(".tmp")]


def test_failed_prepare_keeps_previous_output(tmp_path, galaxy10_h5):
    path, _ = galaxy10_h5
    out = tmp_path / "prep"
    _prepare_h5(path, out)
    before = (out / DATASET_FILE).read_bytes()
    with pytest.raises(DataError):
        _prepare_h5(_bad_h5(tmp_path, "labels_out_of_range"), out)
    assert (out / DATASET_FILE).read_bytes() == before


def test_prepare_streams_in_chunks(tmp_path):
    """Peak Python-side memory stays far below the image array's size."""
    path = tmp_path / "big.h5"
    make_galaxy10_h5(path, n=1500, size=64)
    array_bytes = 1500 * 64 * 64 * 3
    tracemalloc.start()
    _prepare_h5(path, tmp_path / "prep", "data.chunk_size=50")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < array_bytes / 4, (peak, array_bytes)


# ------------------------------------------------------------------ folder


def _folder(tmp_path: Path, n: int = 12, size: int = 40) -> Path:
    root = tmp_path / "cutouts"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    with open(root / "catalog.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["objid", "cls", "file"])
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            name = f"img/g{i}.png" if i % 2 else f"img/g{i}.jpg"
            Image.fromarray(arr).save(root / name)
            w.writerow([f"obj.{i}", i % 3 if i % 4 else ["a", "b", "c"][i % 3], name])
    return root


def _folder_cfg(root: Path, *extra: str):
    return load_config(
        None,
        [
            "data.source=folder",
            f"data.path={root}",
            "data.class_names=[a, b, c]",
            "data.folder.catalog=catalog.csv",
            "data.folder.id_column=objid",
            "data.folder.label_column=cls",
            "data.folder.path_column=file",
            *extra,
        ],
    )


def test_folder_source_crop_resize_and_labels(tmp_path):
    root = _folder(tmp_path)
    cfg = _folder_cfg(root, "data.center_crop=0.5", "data.resize=16")
    summary = prepare(cfg, tmp_path / "prep", progress=False)
    ds = PreparedDataset(tmp_path / "prep" / DATASET_FILE)
    assert summary["image_shape"] == [16, 16, 3] and len(ds) == 12
    assert list(ds.read_column("id"))[:2] == ["obj.0", "obj.1"]
    assert list(ds.read_column("label")) == [i % 3 for i in range(12)]
    png = np.asarray(Image.open(root / "img/g1.png"))[10:30, 10:30]
    expected = np.asarray(Image.fromarray(png).resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(next(ds.iter_batches(2)).images[1], expected)


@pytest.mark.parametrize(
    "damage, pattern",
    [
        ("unreadable", r"g3\.png: unreadable image"),
        ("missing_file", r"1 listed image file\(s\) do not exist: .*g4\.jpg"),
        ("missing_column", r"column\(s\) \['cls'\] not found"),
        ("bad_label", r"column 'cls' must be an integer in \[0, 3\).*'spiral'"),
        ("sizes_differ", r"g7\.png: image is 30x30 but the first image is 40x40"),
    ],
)
def test_bad_folder_inputs(tmp_path, damage, pattern):
    root = _folder(tmp_path)
    catalog = root / "catalog.csv"
    if damage == "unreadable":
        (root / "img/g3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif damage == "missing_file":
        (root / "img/g4.jpg").unlink()
    elif damage == "missing_column":
        catalog.write_text(catalog.read_text().replace("cls", "klass", 1))
    elif damage == "bad_label":
        lines = catalog.read_text().splitlines()
        lines[2] = lines[2].replace(",1,", ",spiral,")
        catalog.write_text("\n".join(lines) + "\n")
    elif damage == "sizes_differ":
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "img/g7.png")
    out = tmp_path / "prep"
    with pytest.raises(DataError, match=pattern):
        prepare(_folder_cfg(root), out, progress=False)
    assert not (out / DATASET_FILE).exists()


# ------------------------------------------------------------------ galaxy10 download


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    fail_after: int | None = None
    requests: list[str | None] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.fail_after is not None and not rng:
            self.wfile.write(body[: self.fail_after])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_download_resumes_and_verifies(tmp_path, http_server):
    payload = np.random.default_rng(0).bytes(3_000_000)
    _RangeHandler.payload, _RangeHandler.fail_after, _RangeHandler.requests = payload, 1_000_000, []
    url = f"http://127.0.0.1:{http_server.server_port}/Galaxy10_DECals.h5"
    dest = tmp_path / "raw" / "Galaxy10_DECals.h5"
    sha = hashlib.sha256(payload).hexdigest()
    with pytest.raises(DataError, match="interrupted at 1000000 of 3000000 bytes"):
        download(url, dest, sha256=sha, progress=False)
    part = dest.with_name(dest.name + ".part")
    assert part.exists() and 0 < part.stat().st_size < len(payload) and not dest.exists()
    _RangeHandler.fail_after = None
    download(url, dest, sha256=sha, progress=False)
    assert dest.read_bytes() == payload and not part.exists()
    assert _RangeHandler.requests == [None, "bytes=1000000-"]


def test_download_rejects_wrong_checksum(tmp_path, http_server):
    _RangeHandler.payload, _RangeHandler.fail_after = b"x" * 1000, None
    url = f"http://127.0.0.1:{http_server.server_port}/f.h5"
    with pytest.raises(DataError, match="expected 00"):
        download(url, tmp_path / "f.h5", sha256="00" * 32, progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_offline_fails_at_once_saying_where_to_put_the_file(tmp_path):
    cfg = load_config(None, ["data.source=galaxy10", "data.galaxy10.url=http://127.0.0.1:9/Galaxy10_DECals.h5"])
    with pytest.raises(DataError) as err:
        ensure_galaxy10(cfg.data, Layout(tmp_path), progress=False)
    msg = str(err.value)
    assert str(tmp_path / "data/raw/Galaxy10_DECals.h5") in msg and "data.path" in msg


def test_local_galaxy10_copy_is_checked(tmp_path, galaxy10_h5):
    path, _ = galaxy10_h5
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    ok = load_config(None, ["data.source=galaxy10", f"data.path={path}", f"data.galaxy10.sha256={good}"])
    assert ensure_galaxy10(ok.data, Layout(tmp_path), progress=False) == path
    bad = load_config(None, ["data.source=galaxy10", f"data.path={path}"])
    with pytest.raises(DataError, match="SHA256 is"):
        ensure_galaxy10(bad.data, Layout(tmp_path), progress=False)

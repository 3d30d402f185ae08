"""The one HDF5 module: Galaxy10-schema files are opened here, for sources, the prepared dataset and predict.

The schema is Galaxy10 DECals': ``images`` (N, H, W, 3), ``ans`` (N,) integer labels, and optional per-row
``ra``, ``dec``, ``redshift``, ``pxscale`` (floats) and ``id`` (strings); the prepared dataset adds ``source_row``.
Galaxy10 calls the label ``ans``; callers name columns as the code does (``label``) and :func:`field` gives the
file's name, so ``ans`` is spelt in this module only.

A truncated file can be opened for what is left of it (``allow_truncated``): predict classifies the rows still on
disk and reports the others (:meth:`H5File.rows_lost`); every other reader refuses such a file.

An intact file must hold what its shapes declare, checked on opening before any work: every chunk of a chunked
column written, a contiguous column allocated and inside the file. A shape is only a header: a 2 KB file can declare
10**9 images whose chunks were never written (a forged file, or a writer that died after ``create_dataset``), which
would read as zeros and send ``prepare`` writing towards a petabyte.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.data.record import OPTIONAL_FLOAT_FIELDS, RecordBatch, error_text
from pipeline.errors import DataError

IMAGES = "images"
STRING = h5py.string_dtype()
_FILE_NAMES = {"label": "ans"}
_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def field(name: str) -> str:
    """The file's name of column ``name`` (Galaxy10's ``ans`` for ``label``, else the name itself)."""
    return _FILE_NAMES.get(name, name)


def decode_ids(values: Iterable[Any]) -> list[str]:
    """An ``id`` column as strings (h5py returns variable-length strings as bytes)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _PaddedFile(io.RawIOBase):
    """A truncated file that claims its recorded length and reads zeros past the real end.

    HDF5 refuses to open a truncated file at all; through this wrapper the rows that are still on
    disk stay readable, and :meth:`H5File.rows_lost` names the rows whose bytes are gone.
    """

    def __init__(self, path: Path, claimed_size: int) -> None:
        super().__init__()
        self._fh = open(path, "rb")
        self._real = os.fstat(self._fh.fileno()).st_size
        self._size = claimed_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self._size - self._pos))
        got = 0
        if self._pos < self._real:
            self._fh.seek(self._pos)
            got = self._fh.readinto(view[: min(n, self._real - self._pos)]) or 0
        view[got:n] = bytes(n - got)
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _rows_beyond(dset: h5py.Dataset, real_size: int) -> list[tuple[int, int]]:
    """Row ranges of ``dset`` whose bytes lie past ``real_size`` (they would read as zeros)."""
    n = dset.shape[0]
    if n == 0:
        return []
    if dset.chunks is None:
        offset = dset.id.get_offset()
        if offset is None:
            return [(0, n)]
        row_bytes = max(1, dset.id.get_storage_size() // n)
        good = max(0, min(n, (real_size - offset) // row_bytes))
        return [(good, n)] if good < n else []
    bad = []
    rows_per_chunk = dset.chunks[0]
    for i in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(i)
        if info.byte_offset is None or info.byte_offset + info.size > real_size:
            lo = info.chunk_offset[0]
            bad.append((lo, min(n, lo + rows_per_chunk)))
    return bad


_SCHEMA = (IMAGES, "label", "id", *OPTIONAL_FLOAT_FIELDS, "source_row")


def _unwritten(dset: h5py.Dataset, file_size: int) -> str | None:
    """Why ``dset`` cannot hold the rows its shape declares (chunks never written, data past the end), or None."""
    plist = dset.id.get_create_plist()
    if dset.size == 0 or plist.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED) or plist.get_external_count():
        return None
    declared = f"declares shape {dset.shape} ({dset.nbytes:,} bytes)"
    if dset.chunks is None:
        offset = dset.id.get_offset()
        if offset is None:
            return f"{declared} but none of it was ever written"
        if offset + dset.nbytes > file_size:
            return f"{declared} but the file holds {file_size:,} bytes"
        return None
    expected = math.prod(math.ceil(n / c) for n, c in zip(dset.shape, dset.chunks))
    written = dset.id.get_num_chunks()
    if written < expected:
        return f"{declared} in {expected:,} chunks but only {written:,} were ever written"
    return None


class H5File:
    """One Galaxy10-schema file: its image array checked on opening, rows read by range, picklable for workers.

    :meth:`open` gives a handle for a ``with`` block; :meth:`handle` keeps one open in this process for many small
    reads (predict's workers) until :meth:`close`.
    """

    def __init__(self, path: Path, *, allow_truncated: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: file not found")
        if not self.path.is_file():
            raise DataError(f"{self.path}: expected an HDF5 file, found a directory")
        self.claimed_size: int | None = None
        try:
            h5py.File(self.path, "r").close()
        except OSError as exc:
            m = _TRUNCATED.search(str(exc))
            if not (allow_truncated and m):
                raise DataError(f"{self.path}: not a readable HDF5 file (truncated or another format?): {exc}") from None
            self.claimed_size = int(m.group(2))
        self._handle: tuple[_PaddedFile | None, h5py.File] | None = None
        self._lost: dict[str, list[tuple[int, int]]] | None = None
        with self.open() as f:
            try:
                self.require(f, IMAGES)
                images = f[IMAGES]
                if not isinstance(images, h5py.Dataset) or images.ndim < 1:
                    raise DataError(f"{self.path}: field 'images' must be an array of images, got {images!r}")
                self.num_rows = int(images.shape[0])
                self.image_shape: tuple[int, ...] = tuple(int(x) for x in images.shape[1:])
                self.image_dtype = np.dtype(images.dtype)
                if self.claimed_size is None:  # a truncated file's lost rows are rows_lost's
                    self._check_written(f)
            except DataError:
                raise
            except Exception as exc:  # a truncation can destroy any header: each fails its own way
                raise DataError(f"{self.path}: cannot read the HDF5 structure ({error_text(exc)})") from None

    def _check_written(self, f: h5py.File) -> None:
        """Refuse a schema column whose declared rows are not all on disk (see the module docstring)."""
        size = self.path.stat().st_size
        for name in _SCHEMA:
            dset = f.get(field(name))
            why = _unwritten(dset, size) if isinstance(dset, h5py.Dataset) else None
            if why:
                raise DataError(f"{self.path}: field {field(name)!r} {why}; expected every declared row written to the file")

    def _open(self) -> tuple[_PaddedFile | None, h5py.File]:
        wrapper = _PaddedFile(self.path, self.claimed_size) if self.claimed_size else None
        return wrapper, h5py.File(wrapper if wrapper is not None else self.path, "r")

    @staticmethod
    def _close(wrapper: _PaddedFile | None, f: h5py.File) -> None:
        f.close()  # the HDF5 file must close before its Python file object, or HDF5 crashes at exit
        if wrapper is not None:
            wrapper.close()

    @contextmanager
    def open(self) -> Iterator[h5py.File]:
        """The file, read-only, for one ``with`` block (its own handle)."""
        wrapper, f = self._open()
        try:
            yield f
        finally:
            self._close(wrapper, f)

    def handle(self) -> h5py.File:
        """A handle kept open in this process until :meth:`close`."""
        if self._handle is None:
            self._handle = self._open()
        return self._handle[1]

    def close(self) -> None:
        if self._handle is not None:
            self._close(*self._handle)
            self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def require(self, f: h5py.File, *names: str) -> None:
        """Refuse a file without the columns ``names`` (code names), listing what it has."""
        missing = [field(n) for n in names if field(n) not in f]
        if missing:
            raise DataError(
                f"{self.path}: missing dataset(s) {missing}; the Galaxy10 schema needs 'images' (N,H,W,3) "
                f"and '{field('label')}' (N,), found {sorted(f.keys())}"
            )

    def check_rgb(self) -> None:
        """Refuse images that are not (N, H, W, 3) (an input; the prepared dataset leaves that to ``validate``)."""
        if len(self.image_shape) != 3 or self.image_shape[-1] != 3:
            shape = (self.num_rows, *self.image_shape)
            raise DataError(f"{self.path}: field 'images' must have shape (N, H, W, 3), got {shape}")

    def check_labels(self, f: h5py.File) -> None:
        """Refuse a file without integer labels (sources train on them)."""
        self.require(f, "label")
        dtype = f[field("label")].dtype
        if not np.issubdtype(dtype, np.integer):
            raise DataError(f"{self.path}: field {field('label')!r} must hold integer labels, got dtype {dtype}")

    def columns(self, f: h5py.File, names: Iterable[str], *, strict: bool) -> list[str]:
        """Which of the per-row columns ``names`` the file has, one value per image.

        ``strict`` refuses a column of another shape; otherwise it counts as absent, as does one whose header a
        truncation destroyed.
        """
        found = []
        for name in names:
            try:
                dset = f.get(field(name))
                shape = getattr(dset, "shape", None)
            except Exception:  # a header a truncation destroyed
                if strict:
                    raise
                continue
            if dset is None:
                continue
            if isinstance(dset, h5py.Dataset) and len(shape) == 1 and shape[0] == self.num_rows:
                found.append(name)
            elif strict:
                raise DataError(
                    f"{self.path}: field {field(name)!r} must have shape ({self.num_rows},) to match 'images', got {shape}"
                )
        return found

    def read(self, f: h5py.File, lo: int, hi: int, names: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """Images of rows ``lo..hi`` and those rows of the columns ``names`` (ids as strings)."""
        images = f[IMAGES][lo:hi]
        cols: dict[str, Any] = {}
        for name in names:
            values = f[field(name)][lo:hi]
            cols[name] = decode_ids(values) if name == "id" else values
        return images, cols

    def attrs(self) -> dict[str, Any]:
        """The file's attributes (the prepared dataset keeps its class names, source and hash there)."""
        with self.open() as f:
            return dict(f.attrs)

    def column(self, name: str) -> np.ndarray:
        """A whole per-row column (labels, ids, coordinates): small next to the images."""
        with self.open() as f:
            values = f[field(name)][:]
        return np.array(decode_ids(values), dtype=object) if name == "id" else values

    def batches(
        self, chunk_size: int, names: Sequence[str], *, start: int = 0, stop: int | None = None
    ) -> Iterator[RecordBatch]:
        """Rows ``start..stop`` as record batches of the columns ``names`` (``label`` among them).

        Without an ``id`` column ids are the zero-padded row; without ``source_row`` the source row is the row itself.
        """
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        with self.open() as f:
            for lo in range(start, stop, chunk_size):
                hi = min(lo + chunk_size, stop)
                try:
                    images, cols = self.read(f, lo, hi, names)
                except (OSError, RuntimeError) as exc:
                    why = f"rows {lo}..{hi - 1} cannot be read (truncated or corrupt file?): {exc}"
                    raise DataError(f"{self.path}: {why}") from None
                yield RecordBatch(
                    images=images,
                    labels=cols["label"].astype(np.int64),
                    ids=cols["id"] if "id" in cols else [f"{i:06d}" for i in range(lo, hi)],
                    source_rows=cols["source_row"] if "source_row" in cols else np.arange(lo, hi, dtype=np.int64),
                    **{k: cols.get(k) for k in OPTIONAL_FLOAT_FIELDS},
                )

    def rows_lost(self, names: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
        """Per column (and ``images``), the row ranges a truncation cut off (through the padding they read as zeros)."""
        if self._lost is None:
            self._lost = {}
            if self.claimed_size:
                real = self.path.stat().st_size
                f = self.handle()
                for name in (IMAGES, *names):
                    self._lost[name] = _rows_beyond(f[field(name)], real)
        return self._lost


class H5Writer:
    """A new Galaxy10-schema file of ``n`` rows, written in consecutive row ranges (prepare, the synthetic data set).

    ``columns`` maps code names to dtypes; ``gzip`` compresses images one row per chunk at that level.
    """

    def __init__(
        self,
        path: Path,
        n: int,
        image_shape: Sequence[int],
        image_dtype: Any,
        columns: Mapping[str, Any],
        *,
        gzip: int | None = None,
    ) -> None:
        self._f = h5py.File(path, "w")
        try:
            compression = {"chunks": (1, *image_shape), "compression": "gzip", "compression_opts": gzip} if gzip else {}
            self._images = self._f.create_dataset(IMAGES, (n, *image_shape), image_dtype, **compression)
            self._columns = {name: self._f.create_dataset(field(name), (n,), dtype) for name, dtype in columns.items()}
        except BaseException:
            self._f.close()
            raise
        self.attrs = self._f.attrs

    def write(self, lo: int, images: np.ndarray, columns: Mapping[str, Any]) -> None:
        """Rows ``lo..lo + len(images)``: the images and every column."""
        hi = lo + len(images)
        self._images[lo:hi] = images
        for name, dset in self._columns.items():
            dset[lo:hi] = columns[name]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

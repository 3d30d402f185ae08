"""Predict's ``h5`` input: a Galaxy10-schema file read by row range through :mod:`pipeline.data.h5`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.catalog.inputs.base import InputKind, InputReader, stat_identity
from pipeline.data.h5 import H5File
from pipeline.data.record import Record, error_text, optional_float
from pipeline.errors import DataError


class H5Input(InputReader):
    """``images`` (N, H, W, 3) uint8 with H == W, optional ``id``, ``ra``, ``dec``; the label is not read.

    A truncated file is read for the rows still on disk; the rows whose bytes are gone become error rows.
    """

    kind: InputKind = "h5"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: HDF5 input not found")
        self.file = H5File(self.path, allow_truncated=True)
        self.file.check_rgb()
        if self.file.image_dtype != np.uint8:
            raise DataError(f"{self.path}: field 'images' must be uint8, got {self.file.image_dtype}")
        height, width, _ = self.file.image_shape
        if height != width:
            raise DataError(f"{self.path}: field 'images' must be (N, H, W, 3) with H == W, got {(self.file.num_rows, *self.file.image_shape)}")
        with self.file.open() as f:
            self.columns = self.file.columns(f, ("id", "ra", "dec"), strict=False)
            self.prepared = "data_hash" in f.attrs  # written by ``prepare``, which keeps a content hash

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "h5", **stat_identity(self.path)}

    @property
    def num_items(self) -> int:
        return self.file.num_rows

    def items(self) -> Iterator[int]:
        return iter(range(self.file.num_rows))

    def _read(self, f: h5py.File, lo: int, hi: int) -> list[Record]:
        images, cols = self.file.read(f, lo, hi, self.columns)
        return [
            Record(
                id=cols["id"][j] if "id" in cols else f"{self.path.stem}-{row}",
                source_file=str(self.path),
                source_row=row,
                ra=optional_float(cols["ra"][j]) if "ra" in cols else None,
                dec=optional_float(cols["dec"][j]) if "dec" in cols else None,
                image=images[j],
            )
            for j, row in enumerate(range(lo, hi))
        ]

    def _read_one(self, f: h5py.File, row: int) -> Record:
        try:
            return self._read(f, row, row + 1)[0]
        except Exception as exc:  # a corrupt compressed chunk: this row's problem only
            return Record(f"{self.path.stem}-{row}", str(self.path), row, error=f"unreadable HDF5 row: {error_text(exc)}")

    def _load(self, items: list[int]) -> list[Record]:
        f = self.file.handle()
        rows = [int(r) for r in items]
        try:
            if rows != list(range(rows[0], rows[0] + len(rows))):
                raise ValueError("non-contiguous rows")
            records = self._read(f, rows[0], rows[-1] + 1)
        except Exception:
            records = [self._read_one(f, row) for row in rows]  # isolate the unreadable rows from the good ones
        lost = self.file.rows_lost(self.columns)
        if lost:
            _drop_lost(records, lost)
        return records

    def close(self) -> None:
        self.file.close()


def _drop_lost(records: list[Record], lost: dict[str, list[tuple[int, int]]]) -> None:
    """Blank what a truncation cut off: no image (an error row) without the image or id bytes, no ra/dec without theirs."""
    for rec in records:
        gone = {name for name, ranges in lost.items() if any(lo <= int(rec.source_row or 0) < hi for lo, hi in ranges)}
        if gone & {"images", "id"}:
            what = "/".join(sorted(gone & {"images", "id"}))
            rec.image, rec.error = None, f"truncated HDF5 file: the row's {what} bytes lie past the end of the file"
        if "ra" in gone:
            rec.ra = None
        if "dec" in gone:
            rec.dec = None

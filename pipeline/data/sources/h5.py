"""Any HDF5 file in the Galaxy10 DECals schema, read chunk by chunk (never the whole image array)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DataError
from pipeline.data.sources.base import OPTIONAL_FLOAT_FIELDS, RecordBatch

REQUIRED = ("images", "ans")


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: expected an HDF5 file, found a directory")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or another format?): {exc}") from None


class H5Source:
    """Schema: ``images`` (N,H,W,3), ``ans`` (N,) integer labels; optional ``ra``, ``dec``, ``redshift``,
    ``pxscale`` (N,) and ``id`` (N,) strings. Class names come from the config."""

    def __init__(self, path: str | Path, *, class_names: Sequence[str], require_labels: bool = True) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        with _open(self.path) as h5:
            missing = [k for k in (REQUIRED if require_labels else ("images",)) if k not in h5]
            if missing:
                raise DataError(
                    f"{self.path}: missing dataset(s) {missing}; the Galaxy10 schema needs 'images' (N,H,W,3) "
                    f"and 'ans' (N,), found {sorted(h5.keys())}"
                )
            images = h5["images"]
            if not isinstance(images, h5py.Dataset) or images.ndim != 4 or images.shape[-1] != 3:
                raise DataError(f"{self.path}: field 'images' must have shape (N, H, W, 3), got {getattr(images, 'shape', None)}")
            self._n = int(images.shape[0])
            self._shape = tuple(int(x) for x in images.shape[1:])
            self._dtype = np.dtype(images.dtype)
            self._fields = [k for k in ("ans", *OPTIONAL_FLOAT_FIELDS, "id") if k in h5]
            for key in self._fields:
                ds = h5[key]
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] != self._n:
                    raise DataError(
                        f"{self.path}: field {key!r} must have shape ({self._n},) to match 'images', got {getattr(ds, 'shape', None)}"
                    )
            if "ans" in h5 and not np.issubdtype(h5["ans"].dtype, np.integer):
                raise DataError(f"{self.path}: field 'ans' must hold integer labels, got dtype {h5['ans'].dtype}")

    def __len__(self) -> int:
        return self._n

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def image_dtype(self) -> np.dtype:
        return self._dtype

    def describe(self) -> dict[str, Any]:
        st = self.path.stat()
        return {"kind": "h5", "path": str(self.path.resolve()), "bytes": st.st_size, "num_images": self._n, "fields": self._fields}

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]:
        with _open(self.path) as h5:
            for lo in range(0, self._n, chunk_size):
                hi = min(lo + chunk_size, self._n)
                try:
                    images = h5["images"][lo:hi]
                    cols = {k: h5[k][lo:hi] for k in self._fields}
                except (OSError, RuntimeError) as exc:
                    raise DataError(f"{self.path}: rows {lo}..{hi - 1} cannot be read (truncated or corrupt file?): {exc}") from None
                if "id" in cols:
                    ids = [x.decode() if isinstance(x, bytes) else str(x) for x in cols["id"]]
                else:
                    ids = [f"{i:06d}" for i in range(lo, hi)]
                yield RecordBatch(
                    images=images,
                    labels=cols["ans"].astype(np.int64) if "ans" in cols else np.full(hi - lo, -1, dtype=np.int64),
                    ids=ids,
                    source_index=np.arange(lo, hi, dtype=np.int64),
                    **{k: cols.get(k) for k in OPTIONAL_FLOAT_FIELDS},
                )

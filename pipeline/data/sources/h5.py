"""Any HDF5 file in the Galaxy10 DECals schema, read chunk by chunk (never the whole image array)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.h5 import H5File, field
from pipeline.data.record import OPTIONAL_FLOAT_FIELDS, RecordBatch


class H5Source:
    """Schema: ``images`` (N,H,W,3), ``ans`` (N,) integer labels; optional ``ra``, ``dec``, ``redshift``,
    ``pxscale`` (N,) and ``id`` (N,) strings. Class names come from the config."""

    def __init__(self, path: str | Path, *, class_names: Sequence[str]) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.file = H5File(self.path)
        self.file.check_rgb()
        with self.file.open() as f:
            self.file.check_labels(f)
            self._fields = self.file.columns(f, ("label", *OPTIONAL_FLOAT_FIELDS, "id"), strict=True)

    def __len__(self) -> int:
        return self.file.num_rows

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.file.image_shape  # type: ignore[return-value]  # (H, W, 3): check_rgb ran

    @property
    def image_dtype(self) -> np.dtype:
        return self.file.image_dtype

    def describe(self) -> dict[str, Any]:
        st = self.path.stat()
        return {
            "kind": "h5",
            "path": str(self.path.resolve()),
            "bytes": st.st_size,
            "num_images": len(self),
            "fields": [field(name) for name in self._fields],
        }

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]:
        """Rows in file order; the source row is the row in this file (a stored ``source_row`` is not read)."""
        return self.file.batches(chunk_size, self._fields)

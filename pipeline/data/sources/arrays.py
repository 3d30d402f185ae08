"""In-memory arrays as a source: for tests, notebooks and callers that already hold the images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.data.record import OPTIONAL_FLOAT_FIELDS, RecordBatch


class ArraySource:
    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        ids: Sequence[str] | None = None,
        **optional: np.ndarray | None,
    ) -> None:
        unknown = set(optional) - set(OPTIONAL_FLOAT_FIELDS)
        if unknown:
            raise TypeError(f"unknown fields {sorted(unknown)}; expected some of {OPTIONAL_FLOAT_FIELDS}")
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = [str(i) for i in (ids if ids is not None else range(len(self.labels)))]
        self.optional = optional

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def image_dtype(self) -> np.dtype:
        return self.images.dtype

    def describe(self) -> dict[str, Any]:
        return {"kind": "arrays", "path": "<memory>", "num_images": len(self)}

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]:
        for lo in range(0, len(self), chunk_size):
            hi = min(lo + chunk_size, len(self))
            yield RecordBatch(
                images=self.images[lo:hi],
                labels=self.labels[lo:hi],
                ids=self.ids[lo:hi],
                source_rows=np.arange(lo, hi),
                **{k: (None if v is None else np.asarray(v)[lo:hi]) for k, v in self.optional.items()},
            )

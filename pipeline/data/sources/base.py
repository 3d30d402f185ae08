"""What every source implements, so prepare/validate/shard never care where images came from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from pipeline.data.pixels import Geometry
from pipeline.data.record import RecordBatch


class Source(Protocol):
    """One module per input kind under ``pipeline/data/sources/`` implements this."""

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def image_dtype(self) -> np.dtype: ...

    def describe(self) -> dict[str, Any]:
        """What the input was (kind, path, size): stored in the prepared dataset and the manifest."""
        ...

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]: ...


class CroppedSource:
    """A source whose images get ``data.center_crop`` and ``data.resize`` chunk by chunk (memory stays one chunk)."""

    def __init__(self, source: Source, geometry: Geometry) -> None:
        self.source = source
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.source)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.geometry.shape(self.source.image_shape)

    @property
    def image_dtype(self) -> np.dtype:
        return self.source.image_dtype

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "center_crop": self.geometry.center_crop, "resize": self.geometry.resize}

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]:
        for batch in self.source.iter_batches(chunk_size):
            batch.images = self.geometry.apply_batch(batch.images)
            yield batch

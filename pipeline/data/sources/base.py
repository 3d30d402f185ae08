"""The record every source yields, so prepare/validate/shard never care where images came from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

OPTIONAL_FLOAT_FIELDS: tuple[str, ...] = ("ra", "dec", "redshift", "pxscale")


@dataclass
class RecordBatch:
    """A chunk of consecutive records; missing ra/dec/redshift/pxscale are NaN."""

    images: np.ndarray  # (n, H, W, 3) uint8
    labels: np.ndarray  # (n,) int64
    ids: list[str]
    source_index: np.ndarray  # (n,) int64: row or line in the original input
    ra: np.ndarray = field(default=None)  # type: ignore[assignment]
    dec: np.ndarray = field(default=None)  # type: ignore[assignment]
    redshift: np.ndarray = field(default=None)  # type: ignore[assignment]
    pxscale: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in OPTIONAL_FLOAT_FIELDS:
            value = getattr(self, name)
            setattr(self, name, np.full(n, np.nan) if value is None else np.asarray(value, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.labels)


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

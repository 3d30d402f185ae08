"""What every source implements, so prepare/validate/shard never care where images came from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

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

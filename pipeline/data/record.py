"""The record: one image and what is known of it, the same whichever file it was read from.

One name per concept, in code, shards and Parquet alike:

* ``id``: the galaxy's id, a string;
* ``label``: its class index (Galaxy10 files call it ``ans``; :mod:`pipeline.data.h5` translates at the file);
* ``row``: its row in the prepared dataset (the shard key and ``split.parquet`` are by ``row``);
* ``source_file``, ``source_row``: the file it was read from and its row or position in that file.

:class:`Record` is one image (what the shard reader, predict's inputs and the catalog handle);
:class:`RecordBatch` holds consecutive records of one input as columns (what sources yield and the prepared
dataset and shard writers take).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OPTIONAL_FLOAT_FIELDS: tuple[str, ...] = ("ra", "dec", "redshift", "pxscale")
MAX_ERROR = 300


@dataclass
class Record:
    """One image (HWC uint8) and its fields; ``error`` says why ``image`` is missing (a bad image is a row, not a crash)."""

    id: str
    source_file: str = ""
    source_row: int | None = None
    row: int | None = None
    label: int | None = None
    ra: float | None = None
    dec: float | None = None
    image: np.ndarray | None = None
    error: str | None = None


@dataclass
class RecordBatch:
    """Consecutive records as columns; missing ra/dec/redshift/pxscale are NaN."""

    images: np.ndarray  # (n, H, W, 3)
    labels: np.ndarray  # (n,) int64
    ids: list[str]
    source_rows: np.ndarray  # (n,) int64: row or line in the original input
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


def optional_float(x: Any) -> float | None:
    """A coordinate as a float, with every flavour of missing (None, NaN, '', garbage) as None."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def error_text(exc: BaseException) -> str:
    """A record's ``error`` for an exception: its type and message, cut to fit a catalog row."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."

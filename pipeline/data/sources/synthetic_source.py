"""The built-in default source: the synthetic Galaxy10-like generator, yielded chunk by chunk."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.data.record import RecordBatch
from pipeline.data.sources.synthetic import generate_arrays


class SyntheticSource:
    def __init__(self, data: DataConfig) -> None:
        if data.num_classes != 10:
            raise ConfigError(
                f"data.class_names: the synthetic source draws the 10 Galaxy10 classes, got {data.num_classes} names"
            )
        self.cfg = data.synthetic

    def __len__(self) -> int:
        return self.cfg.num_images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.image_size, self.cfg.image_size, 3)

    @property
    def image_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "path": "<synthetic>", **self.cfg.model_dump()}

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]:
        n = self.cfg.num_images
        for lo in range(0, n, chunk_size):
            k = min(chunk_size, n - lo)
            arrays = generate_arrays(k, size=self.cfg.image_size, seed=self.cfg.seed, start=lo)
            yield RecordBatch(
                images=arrays["images"],
                labels=arrays["label"].astype(np.int64),
                ids=[f"syn{i:07d}" for i in range(lo, lo + k)],
                source_rows=np.arange(lo, lo + k, dtype=np.int64),
                ra=arrays["ra"],
                dec=arrays["dec"],
                redshift=arrays["redshift"],
                pxscale=arrays["pxscale"],
            )

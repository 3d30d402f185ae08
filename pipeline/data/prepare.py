"""Stage ``prepare``: turn any source into one canonical HDF5 file in the Galaxy10 schema.

The canonical file is the Galaxy10 DECals schema (``images``, the label, ``ra``, ``dec``, ``redshift``,
``pxscale``) plus ``id`` and ``source_row``, uncompressed and contiguous so that the later stages
read it at disk speed. Images keep the source's dtype, so that ``validate`` (not ``prepare``) is
where a float or NaN image is caught and reported. It is itself a valid ``h5`` source. Its attributes hold the class names, a
description of the input and ``data_hash``, a hash of the content (images, labels, ids) that the
shard manifest and the artifact cache key on. It is read and written through :mod:`pipeline.data.h5`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, DataConfig
from pipeline.layout import StageRun
from pipeline.errors import DataError
from pipeline.io import atomic_path
from pipeline.data.h5 import STRING, H5File, H5Writer
from pipeline.data.record import OPTIONAL_FLOAT_FIELDS, RecordBatch
from pipeline.data.sources import open_source
from pipeline.data.sources.base import Source
from pipeline.progress import tqdm

DATASET_FILE = "dataset.h5"
FORMAT_VERSION = 2  # 2: the source row is stored as ``source_row`` (was ``source_index``)
COLUMNS: tuple[str, ...] = ("label", *OPTIONAL_FLOAT_FIELDS, "id", "source_row")


def _label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int32)


class ContentHasher:
    """Order-sensitive hash of images, labels and ids; identical content gives the identical hash.

    SHA-256 because CPUs hash it in hardware (SHA-NI): 2.5x blake2b's speed here, and the hash sees every pixel.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, batch: RecordBatch) -> None:
        self._h.update(np.ascontiguousarray(batch.images).data)
        self._h.update(np.asarray(batch.labels, dtype=np.int64).tobytes())
        self._h.update("\x00".join(batch.ids).encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:32]


def write_prepared(source: Source, path: Path, data: DataConfig, *, progress: bool = True) -> dict[str, Any]:
    """Stream ``source`` into the canonical file at ``path`` (atomically) and return its summary."""
    n = len(source)
    if n == 0:
        raise DataError(f"{source.describe().get('path', 'source')}: no images to prepare")
    shape = source.image_shape
    num_classes = data.num_classes
    hasher = ContentHasher()
    counts = np.zeros(num_classes, dtype=np.int64)
    dtypes = {"label": _label_dtype(num_classes), "id": STRING, "source_row": np.int64}
    columns = {name: dtypes.get(name, np.float64) for name in COLUMNS}
    # SHA-256 releases the GIL: hashing chunk k in a thread overlaps reading chunk k+1 (one thread keeps the order)
    with ThreadPoolExecutor(1, thread_name_prefix="hash") as hashing, atomic_path(path) as tmp, H5Writer(
        tmp, n, shape, source.image_dtype, columns
    ) as out:
        pos = 0
        hashed: Future[None] | None = None
        bar = tqdm(total=n, desc="prepare", unit="img", disable=not progress, dynamic_ncols=True)
        for batch in source.iter_batches(data.chunk_size):
            k = len(batch)
            if pos + k > n:
                raise DataError(f"{source.describe().get('path')}: source yielded more than the {n} records it declared")
            labels = np.asarray(batch.labels)
            _check_labels(labels, batch, num_classes, source)
            out.write(pos, batch.images, _columns(batch, labels))
            counts += np.bincount(labels, minlength=num_classes)
            if hashed is not None:
                hashed.result()  # at most one chunk waits for the hasher: memory stays bounded
            hashed = hashing.submit(hasher.update, batch)
            pos += k
            bar.update(k)
        bar.close()
        if hashed is not None:
            hashed.result()
        if pos != n:
            raise DataError(f"{source.describe().get('path')}: source declared {n} records but yielded {pos}")
        summary = {
            "format_version": FORMAT_VERSION,
            "num_images": n,
            "image_shape": list(shape),
            "class_names": list(data.class_names),
            "class_counts": {name: int(c) for name, c in zip(data.class_names, counts)},
            "source": source.describe(),
            "data_hash": hasher.hexdigest(),
        }
        for key in ("format_version", "data_hash"):
            out.attrs[key] = summary[key]
        out.attrs["class_names"] = json.dumps(summary["class_names"])
        out.attrs["source"] = json.dumps(summary["source"])
    return summary


def _check_labels(labels: np.ndarray, batch: RecordBatch, num_classes: int, source: Source) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{source.describe().get('path')}: label must be in [0, {num_classes}) for "
            f"{num_classes} configured class names; row {int(batch.source_rows[bad[0]])} has {int(labels[bad[0]])}"
            f" ({bad.size} such rows in this chunk)"
        )


def _columns(batch: RecordBatch, labels: np.ndarray) -> dict[str, Any]:
    """A batch's values of every column of the prepared file (:data:`COLUMNS`)."""
    floats = {k: getattr(batch, k) for k in OPTIONAL_FLOAT_FIELDS}
    return {"label": labels, "id": batch.ids, "source_row": batch.source_rows, **floats}


@dataclass
class PreparedDataset:
    """Chunked reader of the canonical file; never loads the whole image array."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: prepared dataset not found (run `astroflow prepare` first)")
        self.file = H5File(self.path)
        attrs = self.file.attrs()
        if attrs.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: prepared dataset format {attrs.get('format_version')}, this version reads "
                f"{FORMAT_VERSION}; run `astroflow prepare` again"
            )
        self.num_images = self.file.num_rows
        self.image_shape = self.file.image_shape
        self.image_dtype = self.file.image_dtype
        self.class_names: list[str] = json.loads(attrs["class_names"])
        self.data_hash: str = str(attrs["data_hash"])
        self.source: dict[str, Any] = json.loads(attrs["source"])

    def __len__(self) -> int:
        return self.num_images

    def read_column(self, name: str) -> np.ndarray:
        """A whole per-row column (``label``, ``id``, coordinates): small next to the images."""
        return self.file.column(name)

    def iter_batches(self, chunk_size: int = 256, start: int = 0, stop: int | None = None) -> Iterator[RecordBatch]:
        return self.file.batches(chunk_size, COLUMNS, start=start, stop=stop)


def prepare(cfg: Config, out_dir: Path, *, workdir: Path = Path("."), progress: bool = True) -> dict[str, Any]:
    """Stage entry point shared by the CLI, DVC and the flows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.data, workdir=workdir, progress=progress)
    summary = write_prepared(source, out_dir / DATASET_FILE, cfg.data, progress=progress)
    return summary


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``prepare`` stage as the graph runs it: the configured source into ``out/dataset.h5``."""
    return prepare(run.cfg, run.out, workdir=run.workdir, progress=run.progress)


def summary_line(summary: dict[str, Any]) -> str:
    return f"prepared {summary['num_images']} images {tuple(summary['image_shape'])}"

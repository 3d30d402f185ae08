"""What every predict input implements: a stable stream of items, its identity, and a picklable ``load``.

Items are lightweight (an HDF5 row, an image path, a tar member's offsets) and grouped into chunks of
``chunk_size`` items; a chunk id is derived from the input's identity and the chunk index, so a restarted run
recognises the chunks it already committed. An item already known to be unreadable while planning (a truncated
shard, a catalog row without a path) is an error :class:`~pipeline.data.record.Record` in the item stream.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import stable_hash
from pipeline.data.pixels import Geometry
from pipeline.data.record import Record, error_text

InputKind = Literal["h5", "shards", "folder", "zoobot"]


def check_image(image: np.ndarray) -> str | None:
    """Why ``image`` cannot be classified, or None.

    Cutouts must be square RGB uint8: resizing a non-square image to the model's square input would
    stretch the galaxy, and stretching is exactly what separates 'Round Smooth' from 'Cigar Shaped'.
    """
    if not isinstance(image, np.ndarray):
        return f"not an array: {type(image).__name__}"
    if image.dtype != np.uint8:
        return f"dtype {image.dtype}, expected uint8"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"wrong shape {tuple(image.shape)}, expected (H, W, 3)"
    if image.shape[0] != image.shape[1] or image.shape[0] == 0:
        return f"wrong shape {tuple(image.shape)}: cutouts must be square and non-empty"
    return None


def stat_identity(path: Path) -> dict[str, Any]:
    """A file's identity by resolved path, size and mtime."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class InputReader:
    """Base of the four readers: a stable item stream, its identity, and a picklable ``load``."""

    kind: InputKind
    path: Path
    #: The model's ``data.center_crop``/``data.resize``, applied to every image read (:func:`with_geometry`).
    geometry: Geometry = Geometry()
    #: Images written by ``prepare`` (shards, a prepared dataset file): they already have the crop and resize.
    prepared: bool = False

    @property
    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def num_items(self) -> int | None:
        """Item count when it is cheap to know (progress bar total), else None."""
        return None

    def items(self) -> Iterator[Any]:
        raise NotImplementedError

    def _load(self, items: list[Any]) -> list[Record]:
        raise NotImplementedError

    def load(self, items: Sequence[Any]) -> list[Record]:
        """One :class:`Record` per item, in order, its image under :attr:`geometry`; never raises for a bad item."""
        out: list[Record | None] = [replace(it) if isinstance(it, Record) else None for it in items]
        good = [i for i, rec in enumerate(out) if rec is None]
        if good:
            for i, rec in zip(good, self._load([items[i] for i in good])):
                out[i] = self._crop(rec) if self.geometry else rec
        return out  # type: ignore[return-value]

    def _crop(self, rec: Record) -> Record:
        if rec.image is not None and rec.error is None:
            try:
                rec.image = self.geometry.apply(rec.image)
            except Exception as exc:  # an image the crop cannot take is that row's problem only
                rec.image, rec.error = None, f"data.center_crop/resize failed: {error_text(exc)}"
        return rec

    def close(self) -> None:
        """Release file handles opened by ``load`` in this process."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "num_items": self.num_items}

    def input_key(self, chunk_size: int) -> str:
        """Identity of this input cut into chunks of ``chunk_size``: the prefix of every chunk id."""
        return stable_hash({"identity": self.identity, "chunk_size": chunk_size})


@dataclass
class ChunkPlan:
    """Items of one chunk, not yet decoded."""

    index: int
    chunk_id: str
    items: list[Any]


@dataclass
class Chunk:
    """A decoded chunk: the uniform view of any input, one record per item (an image or the reason there is none)."""

    index: int
    chunk_id: str
    records: list[Record] = field(default_factory=list)

    @property
    def errors(self) -> list[Record]:
        return [r for r in self.records if r.error is not None]


def plan_chunks(reader: InputReader, chunk_size: int, *, done: Container[int] = (), first: int = 0) -> Iterator[ChunkPlan]:
    """Chunks of ``chunk_size`` items in input order from chunk ``first`` on, skipping the indices in ``done``.

    A fan-out call for chunk ``first`` skips the items before it without buffering them, so the calls of a run
    cost O(items) each in C (``islice``), not a Python loop over every earlier chunk.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    key = reader.input_key(chunk_size)
    buf: list[Any] = []
    index = first
    for item in islice(reader.items(), first * chunk_size, None):
        buf.append(item)
        if len(buf) == chunk_size:
            if index not in done:
                yield ChunkPlan(index, f"{key}-{index:06d}", buf)
            buf, index = [], index + 1
    if buf and index not in done:
        yield ChunkPlan(index, f"{key}-{index:06d}", buf)


def iter_chunks(reader: InputReader, chunk_size: int, *, done: Container[int] = ()) -> Iterator[Chunk]:
    """Decoded chunks in this process: the simple, single-process view of any input."""
    try:
        for plan in plan_chunks(reader, chunk_size, done=done):
            records = reader.load(plan.items)
            for rec in records:
                if rec.error is None and (why := check_image(rec.image)) is not None:
                    rec.image, rec.error = None, why
            yield Chunk(plan.index, plan.chunk_id, records)
    finally:
        reader.close()


def with_geometry(reader: InputReader, geometry: Geometry) -> InputReader:
    """``reader`` with a model's crop and resize when its images are raw: the training images got them in ``prepare``."""
    if not reader.prepared:
        reader.geometry = geometry
    return reader

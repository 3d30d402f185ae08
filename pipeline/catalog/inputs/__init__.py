"""The four inputs ``predict`` reads, behind one streaming interface (:class:`InputReader`).

Every input is read as a stable sequence of lightweight *items*, grouped into chunks of ``chunk_size``
items (:func:`plan_chunks`). Items are decoded by :meth:`InputReader.load` into
:class:`~pipeline.data.record.Record` s, one per item, each holding either an image or the reason it could
not be read: a bad image becomes an error row, never an exception.

``load`` is what DataLoader workers run, so readers are small picklable objects that open files
lazily in the process that decodes, and never hold a whole input in memory.

Identity (what makes a re-run a no-op):

* ``h5``: resolved path, size and mtime of the file (:mod:`.h5`);
* ``shards``: the SHA256 of every shard from ``manifest.json`` (path-independent), else path, size and
  mtime of every ``.tar`` (:mod:`.shards`);
* ``folder``: resolved path plus the relative path, size and mtime of every image (or of its CSV) (:mod:`.files`);
* ``zoobot``: resolved path, size and mtime of the catalog file (:mod:`.files`);
* both image-file inputs add the pixel rule's settings (``data.folder.pixels``).

Raw inputs (``h5`` other than a prepared dataset, ``folder``, ``zoobot``) take the model's ``data.center_crop`` and
``data.resize`` (``geometry``), as ``prepare`` gave its training images; shards were prepared with them already.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.catalog.inputs.base import (
    Chunk, ChunkPlan, InputKind, InputReader, check_image, iter_chunks, plan_chunks, with_geometry,
)
from pipeline.catalog.inputs.files import FolderInput, TableInput
from pipeline.catalog.inputs.h5 import H5Input
from pipeline.catalog.inputs.shards import ShardsInput
from pipeline.config import PixelsConfig
from pipeline.data.record import Record
from pipeline.data.shards import MANIFEST
from pipeline.errors import DataError

__all__ = [
    "Chunk", "ChunkPlan", "FolderInput", "H5Input", "InputKind", "InputReader", "Record", "ShardsInput", "TableInput",
    "check_image", "detect_kind", "iter_chunks", "open_input", "plan_chunks", "with_geometry",
]

H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def detect_kind(path: Path) -> InputKind:
    """The input kind of ``path`` from what it is: a file's suffix, or a directory's contents."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in H5_SUFFIXES:
            return "h5"
        if suffix in TABLE_SUFFIXES:
            return "zoobot"
        if suffix == ".tar":
            return "shards"
        raise DataError(f"{path}: cannot tell the input kind from suffix {suffix!r}; set predict.input_kind")
    if path.is_dir():
        if (path / MANIFEST).is_file() or any(path.glob("*.tar")):
            return "shards"
        return "folder"
    raise DataError(f"{path}: input not found")


def open_input(
    path: Path | None,
    kind: str = "auto",
    *,
    shards_dir: Path | None = None,
    split: str = "test",
    pixels: PixelsConfig | None = None,
) -> InputReader:
    """The reader for ``path`` (``kind`` auto-detected unless given); None means ``split`` of ``shards_dir``.

    ``pixels`` is the pixel rule for image files (``data.folder.pixels``: the one training used; default settings if None).
    """
    if path is None:
        if shards_dir is None:
            raise DataError("no input given and no shards directory to take the test split from")
        return ShardsInput(Path(shards_dir), splits=[split])
    path = Path(path)
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "h5":
        return H5Input(path)
    if kind == "shards":
        return ShardsInput(path)
    if kind == "folder":
        return FolderInput(path, pixels)
    if kind == "zoobot":
        if path.is_dir():
            raise DataError(f"{path}: a Zoobot catalog is a CSV or Parquet file, got a directory")
        return TableInput(path, pixels=pixels)
    raise DataError(f"unknown input kind {kind!r}; expected auto, h5, shards, folder or zoobot")

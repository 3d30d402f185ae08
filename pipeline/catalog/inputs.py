"""The four inputs ``predict`` reads, behind one streaming interface.

Every input is read as a stable sequence of lightweight *items* (an HDF5 row, an image path, a tar
member's offsets), grouped into chunks of ``chunk_size`` items. A chunk id is derived from the input's
identity and the chunk index, so a restarted run recognises the chunks it already committed. Items are
decoded by :meth:`InputReader.load` into :class:`Record` s, one per item, each holding either an image
or the reason it could not be read: a bad image becomes an error row, never an exception.

``load`` is what DataLoader workers run, so readers are small picklable objects that open files
lazily in the process that decodes, and never hold a whole input in memory.

Identity (what makes a re-run a no-op):

* ``h5``: resolved path, size and mtime of the file;
* ``shards``: the SHA256 of every shard from ``manifest.json`` (path-independent), else path, size and
  mtime of every ``.tar``;
* ``folder``: resolved path plus the relative path, size and mtime of every image (or of its CSV);
* ``zoobot``: resolved path, size and mtime of the catalog file.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import stable_hash
from pipeline.errors import DataError
from pipeline.data.image_files import read_image_files

InputKind = Literal["h5", "shards", "folder", "zoobot"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
ZOOBOT_ID, ZOOBOT_PATH = "id_str", "file_loc"
FOLDER_ID_COLUMNS = ("id_str", "id")
FOLDER_PATH_COLUMNS = ("file_loc", "path", "filename", "file")
MAX_REASON = 300


@dataclass
class Record:
    """One input item after decoding: an HWC uint8 image, or ``error`` saying why there is none."""

    id: str
    source_file: str
    source_row: int | None
    ra: float | None = None
    dec: float | None = None
    image: np.ndarray | None = None
    error: str | None = None


@dataclass(frozen=True)
class BadItem:
    """An item known to be unreadable while planning (a truncated shard, a catalog row without a path)."""

    id: str
    source_file: str
    source_row: int | None
    reason: str


@dataclass
class ChunkPlan:
    """Items of one chunk, not yet decoded."""

    index: int
    chunk_id: str
    items: list[Any]


@dataclass
class Chunk:
    """A decoded chunk: the uniform view of any input (ids, source, row, image or error, ra, dec)."""

    index: int
    chunk_id: str
    records: list[Record] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def errors(self) -> list[Record]:
        return [r for r in self.records if r.error is not None]


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _float(x: Any) -> float | None:
    """Coordinates as floats, with every flavour of missing (None, NaN, '') as None."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


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


class InputReader:
    """Base of the four readers: a stable item stream, its identity, and a picklable ``load``."""

    kind: InputKind
    path: Path

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
        """One :class:`Record` per item, in order; never raises for a bad item."""
        out: list[Record | None] = [None] * len(items)
        good = [i for i, it in enumerate(items) if not isinstance(it, BadItem)]
        for i, it in enumerate(items):
            if isinstance(it, BadItem):
                out[i] = Record(it.id, it.source_file, it.source_row, error=it.reason)
        if good:
            for i, rec in zip(good, self._load([items[i] for i in good])):
                out[i] = rec
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Release file handles opened by ``load`` in this process."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "num_items": self.num_items}

    def input_key(self, chunk_size: int) -> str:
        """Identity of this input cut into chunks of ``chunk_size``: the prefix of every chunk id."""
        return stable_hash({"identity": self.identity, "chunk_size": chunk_size})


def _stat_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ------------------------------------------------------------------ HDF5


class _PaddedFile(io.RawIOBase):
    """A truncated file that claims its recorded length and reads zeros past the real end.

    HDF5 refuses to open a truncated file at all; through this wrapper the rows that are still on
    disk stay readable, and :class:`H5Input` reports the rows whose bytes are gone as errors.
    """

    def __init__(self, path: Path, claimed_size: int) -> None:
        super().__init__()
        self._fh = open(path, "rb")
        self._real = os.fstat(self._fh.fileno()).st_size
        self._size = claimed_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self._size - self._pos))
        got = 0
        if self._pos < self._real:
            self._fh.seek(self._pos)
            got = self._fh.readinto(view[: min(n, self._real - self._pos)]) or 0
        view[got:n] = bytes(n - got)
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


@contextmanager
def _open_h5(path: Path, claimed_size: int | None) -> Iterator[h5py.File]:
    wrapper = _PaddedFile(path, claimed_size) if claimed_size else None
    f = h5py.File(wrapper if wrapper is not None else path, "r")
    try:
        yield f
    finally:
        f.close()  # the HDF5 file must close before its Python file object, or HDF5 crashes at exit
        if wrapper is not None:
            wrapper.close()


def _rows_beyond(dset: h5py.Dataset, real_size: int) -> list[tuple[int, int]]:
    """Row ranges of ``dset`` whose bytes lie past ``real_size`` (they would read as zeros)."""
    n = dset.shape[0]
    if n == 0:
        return []
    if dset.chunks is None:
        offset = dset.id.get_offset()
        if offset is None:
            return [(0, n)]
        row_bytes = max(1, dset.id.get_storage_size() // n)
        good = max(0, min(n, (real_size - offset) // row_bytes))
        return [(good, n)] if good < n else []
    bad = []
    rows_per_chunk = dset.chunks[0]
    for i in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(i)
        if info.byte_offset is None or info.byte_offset + info.size > real_size:
            lo = info.chunk_offset[0]
            bad.append((lo, min(n, lo + rows_per_chunk)))
    return bad


class H5Input(InputReader):
    """A Galaxy10-schema file: ``images`` (N, H, W, 3) uint8, optional ``id``, ``ra``, ``dec``; read by row range."""

    kind: InputKind = "h5"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: HDF5 input not found")
        self._claimed: int | None = None
        try:
            h5py.File(self.path, "r").close()
        except OSError as exc:
            m = _TRUNCATED.search(str(exc))
            if not m:
                raise DataError(f"{self.path}: not a readable HDF5 file ({exc})") from None
            self._claimed = int(m.group(2))
        try:
            with _open_h5(self.path, self._claimed) as f:
                self._check_schema(f)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read the HDF5 structure ({_reason(exc)})") from None
        self._handle: tuple[_PaddedFile | None, h5py.File] | None = None
        self._bad: dict[str, list[tuple[int, int]]] | None = None

    def _check_schema(self, f: h5py.File) -> None:
        if "images" not in f:
            raise DataError(f"{self.path}: field 'images' missing (Galaxy10 schema: images (N, H, W, 3) uint8)")
        images = f["images"]
        shape = tuple(images.shape)
        if images.dtype != np.uint8:
            raise DataError(f"{self.path}: field 'images' must be uint8, got {images.dtype}")
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise DataError(f"{self.path}: field 'images' must be (N, H, W, 3) with H == W, got {shape}")
        self.num_rows = shape[0]
        self.columns = [c for c in ("id", "ra", "dec") if self._has_column(f, c)]

    def _has_column(self, f: h5py.File, name: str) -> bool:
        """An optional per-row column; one whose header a truncation destroyed counts as absent."""
        try:
            return name in f and f[name].shape[:1] == (self.num_rows,)
        except Exception:
            return False

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "h5", **_stat_identity(self.path)}

    @property
    def num_items(self) -> int:
        return self.num_rows

    def items(self) -> Iterator[int]:
        return iter(range(self.num_rows))

    def _file(self) -> h5py.File:
        if self._handle is None:
            wrapper = _PaddedFile(self.path, self._claimed) if self._claimed else None
            self._handle = (wrapper, h5py.File(wrapper if wrapper is not None else self.path, "r"))
        return self._handle[1]

    def _bad_ranges(self, f: h5py.File) -> dict[str, list[tuple[int, int]]]:
        """Per dataset, the row ranges a truncation cut off (read through the padding they are zeros)."""
        if self._bad is None:
            self._bad = {}
            if self._claimed:
                real = self.path.stat().st_size
                for name in ("images", *self.columns):
                    self._bad[name] = _rows_beyond(f[name], real)
        return self._bad

    def _read(self, f: h5py.File, lo: int, hi: int) -> list[Record]:
        images = f["images"][lo:hi]
        cols = {c: f[c][lo:hi] for c in self.columns}
        out = []
        for j, row in enumerate(range(lo, hi)):
            raw_id = cols["id"][j] if "id" in cols else f"{self.path.stem}-{row}"
            out.append(
                Record(
                    id=raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id),
                    source_file=str(self.path),
                    source_row=row,
                    ra=_float(cols["ra"][j]) if "ra" in cols else None,
                    dec=_float(cols["dec"][j]) if "dec" in cols else None,
                    image=images[j],
                )
            )
        return out

    def _load(self, items: list[int]) -> list[Record]:
        f = self._file()
        rows = [int(r) for r in items]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        try:
            if not contiguous:
                raise ValueError("non-contiguous rows")
            records = self._read(f, rows[0], rows[-1] + 1)
        except Exception:
            records = []
            for row in rows:  # isolate the unreadable rows (a corrupt compressed chunk) from the good ones
                try:
                    records.extend(self._read(f, row, row + 1))
                except Exception as exc:
                    records.append(
                        Record(f"{self.path.stem}-{row}", str(self.path), row, error=f"unreadable HDF5 row: {_reason(exc)}")
                    )
        bad = self._bad_ranges(f)
        if bad:
            for rec in records:
                lost = {name for name, ranges in bad.items() if any(lo <= int(rec.source_row or 0) < hi for lo, hi in ranges)}
                if lost & {"images", "id"}:
                    rec.image, rec.error = None, f"truncated HDF5 file: the row's {'/'.join(sorted(lost & {'images', 'id'}))} bytes lie past the end of the file"
                if "ra" in lost:
                    rec.ra = None
                if "dec" in lost:
                    rec.dec = None
        return records

    def close(self) -> None:
        if self._handle is not None:
            wrapper, f = self._handle
            f.close()
            if wrapper is not None:
                wrapper.close()
            self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}


# ------------------------------------------------------------------ shards


_KEY = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")
_SHARD_IMAGE_EXT = ("png", "jpg", "jpeg", "npy")


@dataclass(frozen=True)
class ShardItem:
    tar: str
    key: str
    index: int
    ext: str
    offset: int
    size: int
    meta_offset: int | None
    meta_size: int


class ShardsInput(InputReader):
    """WebDataset shards in our format (``docs/design.md``), indexed by member offset so workers read at random."""

    kind: InputKind = "shards"

    def __init__(self, path: Path, splits: Sequence[str] | None = None) -> None:
        from pipeline.data.shards import MANIFEST, SPLITS

        self.path = Path(path)
        self.splits = list(splits) if splits else None
        self._expected: dict[str, int] = {}
        self._sha: dict[str, str] = {}
        if self.path.is_file():
            self.tars = [self.path.resolve()]
        elif (self.path / MANIFEST).is_file():
            manifest = json.loads((self.path / MANIFEST).read_text())
            names = self.splits or [s for s in SPLITS if s in manifest["splits"]] or list(manifest["splits"])
            missing = [s for s in names if s not in manifest["splits"]]
            if missing:
                raise DataError(f"{self.path / MANIFEST}: no split(s) {missing}; have {sorted(manifest['splits'])}")
            self.tars = []
            for split in names:
                for s in manifest["splits"][split]["shards"]:
                    tar = (self.path / s["name"]).resolve()
                    self.tars.append(tar)
                    self._sha[str(tar)] = s["sha256"]
                    n = s.get("num_samples")
                    if n is not None:
                        self._expected[str(tar)] = int(n)
            self._split_counts = {s: int(manifest["splits"][s]["num_samples"]) for s in names}
        elif self.path.is_dir():
            self.tars = sorted(p.resolve() for p in self.path.glob("*.tar"))
        else:
            raise DataError(f"{self.path}: shard input not found")
        if not self.tars:
            raise DataError(f"{self.path}: no .tar shards found")

    @property
    def identity(self) -> dict[str, Any]:
        shards: list[dict[str, Any]] = []
        for tar in self.tars:
            if str(tar) in self._sha:
                shards.append({"sha256": self._sha[str(tar)]})
            elif tar.is_file():
                shards.append(_stat_identity(tar))
            else:
                shards.append({"path": str(tar), "missing": True})
        return {"kind": "shards", "shards": shards}

    @property
    def num_items(self) -> int | None:
        counts = getattr(self, "_split_counts", None)
        return sum(counts.values()) if counts else None

    def items(self) -> Iterator[ShardItem | BadItem]:
        for tar in self.tars:
            yield from self._index(tar)

    def _index(self, tar: Path) -> Iterator[ShardItem | BadItem]:
        """Samples of one shard from its tar headers (member data is skipped by seeking, not read)."""
        name = str(tar)
        if not tar.is_file():
            yield BadItem(f"{tar.name}#missing", name, None, "shard file missing")
            return
        real = tar.stat().st_size
        count = 0
        current: dict[str, Any] | None = None

        def flush(sample: dict[str, Any]) -> ShardItem | BadItem:
            src = sample["members"]
            img = next((e for e in _SHARD_IMAGE_EXT if e in src), None)
            ident = f"{tar.name}:{sample['key']}"
            if img is None:
                return BadItem(ident, name, sample["index"], "sample has no image member (.png/.jpg/.npy)")
            off, size = src[img]
            if off + size > real:
                return BadItem(ident, name, sample["index"], "truncated shard: the image member runs past the end of the file")
            meta = src.get("json")
            if meta is not None and meta[0] + meta[1] > real:
                meta = None
            return ShardItem(name, sample["key"], sample["index"], img, off, size, *(meta or (None, 0)))

        end = 0
        tail_reported = False
        try:
            with tarfile.open(tar, "r:") as tf:
                for member in tf:
                    end = member.offset_data + member.size
                    if not member.isfile():
                        continue
                    m = _KEY.match(member.name)
                    if not m:
                        continue
                    key, ext = m.group(1), m.group(2).lower()
                    if current is None or current["key"] != key:
                        if current is not None:
                            yield flush(current)
                            count += 1
                        current = {"key": key, "index": count, "members": {}}
                    current["members"][ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            if current is not None:
                yield flush(current)
                count += 1
                current = None
            yield BadItem(f"{tar.name}#tail", name, count, f"unreadable shard after {count} samples: {_reason(exc)}")
            tail_reported = True
        else:
            if current is not None:
                yield flush(current)
                count += 1
            if _tail_is_garbage(tar, end):
                yield BadItem(f"{tar.name}#tail", name, count, f"truncated shard: unreadable data after {count} samples")
                tail_reported = True
        expected = self._expected.get(name)
        if expected is not None and count < expected and not tail_reported:
            yield BadItem(f"{tar.name}#tail", name, count, f"truncated shard: {count} samples, the manifest lists {expected}")

    def _load(self, items: list[ShardItem]) -> list[Record]:
        from pipeline.data.shards import decode_image

        out = []
        handles: dict[str, Any] = {}
        try:
            for it in items:
                rec = Record(f"{Path(it.tar).name}:{it.key}", it.tar, it.index)
                try:
                    fh = handles.get(it.tar) or handles.setdefault(it.tar, open(it.tar, "rb"))
                    if it.meta_offset is not None:
                        fh.seek(it.meta_offset)
                        meta = json.loads(fh.read(it.meta_size))
                        rec.id = str(meta.get("id", rec.id))
                        rec.ra, rec.dec = _float(meta.get("ra")), _float(meta.get("dec"))
                    fh.seek(it.offset)
                    data = fh.read(it.size)
                    if len(data) != it.size:
                        raise EOFError(f"image member truncated ({len(data)} of {it.size} bytes)")
                    ext = "jpg" if it.ext == "jpeg" else it.ext
                    rec.image = decode_image({ext: data, "__key__": it.key, "__url__": it.tar})
                except Exception as exc:
                    rec.error = _reason(exc)
                out.append(rec)
        finally:
            for fh in handles.values():
                fh.close()
        return out


def _tail_is_garbage(tar: Path, end: int) -> bool:
    """True when the bytes after the last member are not the zero end-of-archive blocks.

    ``tarfile`` ends iteration quietly at a header cut short, so this is how a shard truncated
    inside a header is told apart from a complete one.
    """
    with open(tar, "rb") as fh:
        fh.seek(-(-end // 512) * 512)
        while block := fh.read(1 << 16):
            if block.count(0) != len(block):
                return True
    return False


# ------------------------------------------------------------------ image files: folder and catalogs


@dataclass(frozen=True)
class FileItem:
    id: str
    path: str
    row: int
    ra: float | None = None
    dec: float | None = None


class _FileInput(InputReader):
    def _load(self, items: list[FileItem]) -> list[Record]:
        records = [Record(it.id, it.path, it.row, it.ra, it.dec) for it in items]
        for rec, image in zip(records, read_image_files([it.path for it in items])):
            if isinstance(image, np.ndarray):
                rec.image = image
            else:
                rec.error = _reason(image)
        return records


class FolderInput(_FileInput):
    """A directory of JPEG/PNG cutouts (searched recursively), or of the images listed by its one CSV.

    Without a CSV the id is the image's path relative to the folder, without its suffix. With a CSV
    (exactly one ``*.csv`` at the top level) the id comes from ``id_str`` or ``id``, the path from
    ``file_loc``, ``path``, ``filename`` or ``file`` (relative to the folder), ra/dec when present.
    """

    kind: InputKind = "folder"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: image folder not found")
        csvs = sorted(self.path.glob("*.csv"))
        if len(csvs) > 1:
            raise DataError(
                f"{self.path}: {len(csvs)} CSV files ({', '.join(p.name for p in csvs)}); keep one, or pass the CSV "
                "itself as a Zoobot catalog (columns id_str, file_loc)"
            )
        self.table = TableInput(csvs[0], base_dir=self.path, id_columns=FOLDER_ID_COLUMNS, path_columns=FOLDER_PATH_COLUMNS) if csvs else None
        self._files: list[tuple[str, int, int]] | None = None

    def _listing(self) -> list[tuple[str, int, int]]:
        """(relative posix path, size, mtime_ns) of every image, sorted so that chunking is stable.

        Listed once per reader (identity, count and items share it); hidden files and folders are skipped.
        """
        if self._files is None:
            found: list[tuple[str, int, int]] = []
            stack = [("", str(self.path))]
            while stack:
                prefix, directory = stack.pop()
                with os.scandir(directory) as entries:
                    for e in entries:
                        if e.name.startswith("."):
                            continue
                        if e.is_dir():
                            stack.append((f"{prefix}{e.name}/", e.path))
                        elif e.name.lower().endswith(IMAGE_SUFFIXES):
                            st = e.stat()
                            found.append((prefix + e.name, st.st_size, st.st_mtime_ns))
            found.sort()
            self._files = found
        return self._files

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}  # workers only decode items: never ship the listing to them

    @property
    def identity(self) -> dict[str, Any]:
        if self.table is not None:
            return {"kind": "folder", "catalog": self.table.identity}
        return {"kind": "folder", "path": str(self.path.resolve()), "listing": stable_hash(self._listing())}

    @property
    def num_items(self) -> int | None:
        if self.table is not None:
            return self.table.num_items
        return len(self._listing())

    def items(self) -> Iterator[FileItem | BadItem]:
        if self.table is not None:
            yield from self.table.items()
            return
        base = self.path.resolve()
        for row, (rel, _, _) in enumerate(self._listing()):
            yield FileItem(id=rel.rsplit(".", 1)[0], path=str(base / rel), row=row)


class TableInput(_FileInput):
    """A catalog table (CSV or Parquet) with an id and an image path per row, streamed in record batches.

    The Zoobot convention is ``id_str`` (unique string id) and ``file_loc`` (image path); relative paths
    are taken relative to ``base_dir`` (default: the catalog's folder). ``ra``/``dec`` are used when present.
    """

    kind: InputKind = "zoobot"

    def __init__(
        self,
        path: Path,
        *,
        base_dir: Path | None = None,
        id_columns: Sequence[str] = (ZOOBOT_ID,),
        path_columns: Sequence[str] = (ZOOBOT_PATH,),
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: catalog not found")
        self.base_dir = Path(base_dir or self.path.parent).resolve()
        self.is_parquet = self.path.suffix.lower() in (".parquet", ".pq")
        names = self._column_names()
        self.id_col = next((c for c in id_columns if c in names), None)
        self.path_col = next((c for c in path_columns if c in names), None)
        missing = [want for want, got in ((" or ".join(id_columns), self.id_col), (" or ".join(path_columns), self.path_col)) if got is None]
        if missing:
            raise DataError(f"{self.path}: column(s) {', '.join(repr(m) for m in missing)} missing; have {names}")
        self.coord_cols = [c for c in ("ra", "dec") if c in names]

    def _column_names(self) -> list[str]:
        try:
            if self.is_parquet:
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            with pacsv.open_csv(self.path) as reader:
                return list(reader.schema.names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{self.path}: not a readable {'Parquet' if self.is_parquet else 'CSV'} catalog ({exc})") from None

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "table", **_stat_identity(self.path), "columns": [self.id_col, self.path_col]}

    @property
    def num_items(self) -> int | None:
        return pq.ParquetFile(self.path).metadata.num_rows if self.is_parquet else None

    def _batches(self) -> Iterator[pa.RecordBatch]:
        columns = [self.id_col, self.path_col, *self.coord_cols]
        if self.is_parquet:
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=8192, columns=columns)
            return
        convert = pacsv.ConvertOptions(
            include_columns=columns,
            column_types={self.id_col: pa.string(), self.path_col: pa.string()},
        )
        with pacsv.open_csv(self.path, convert_options=convert) as reader:
            yield from reader

    def items(self) -> Iterator[FileItem | BadItem]:
        row = 0
        for batch in self._batches():
            cols = batch.to_pydict()
            for j in range(batch.num_rows):
                ident, loc = cols[self.id_col][j], cols[self.path_col][j]
                ident = f"{self.path.stem}-{row}" if ident is None else str(ident)
                if loc is None or str(loc).strip() == "":
                    yield BadItem(ident, str(self.path), row, f"catalog row has no {self.path_col}")
                else:
                    full = Path(str(loc)).expanduser()
                    full = full if full.is_absolute() else self.base_dir / full
                    ra = _float(cols["ra"][j]) if "ra" in cols else None
                    dec = _float(cols["dec"][j]) if "dec" in cols else None
                    yield FileItem(ident, str(full), row, ra, dec)
                row += 1


# ------------------------------------------------------------------ choosing and chunking


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
        if (path / "manifest.json").is_file() or any(path.glob("*.tar")):
            return "shards"
        return "folder"
    raise DataError(f"{path}: input not found")


def open_input(
    path: Path | None,
    kind: str = "auto",
    *,
    shards_dir: Path | None = None,
    split: str = "test",
) -> InputReader:
    """The reader for ``path`` (``kind`` auto-detected unless given); None means ``split`` of ``shards_dir``."""
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
        return FolderInput(path)
    if kind == "zoobot":
        if path.is_dir():
            raise DataError(f"{path}: a Zoobot catalog is a CSV or Parquet file, got a directory")
        return TableInput(path)
    raise DataError(f"unknown input kind {kind!r}; expected auto, h5, shards, folder or zoobot")


def plan_chunks(reader: InputReader, chunk_size: int, *, done: Container[int] = ()) -> Iterator[ChunkPlan]:
    """Chunks of ``chunk_size`` items in input order, skipping the indices in ``done``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    key = reader.input_key(chunk_size)
    buf: list[Any] = []
    index = 0
    for item in reader.items():
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

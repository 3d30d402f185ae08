"""Predict's image-file inputs: a folder of cutouts (with or without its CSV), and Zoobot-convention catalogs.

Files are decoded under the pixel rule training uses (``data.folder.pixels``, docs/pixels.md): JPEG, PNG
and FITS, single-band or per-band FITS sets included. An entry that cannot be listed (a dangling link,
an unreadable directory) is an error row like an unreadable image; the rest of the folder is classified.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.catalog.inputs.base import InputKind, InputReader, stat_identity
from pipeline.config import PixelsConfig, stable_hash
from pipeline.data.image_files import read_image_files
from pipeline.data.pixels import CUTOUT_SUFFIXES, is_fits, split_suffix
from pipeline.data.record import Record, error_text, optional_float
from pipeline.errors import DataError

ZOOBOT_ID, ZOOBOT_PATH = "id_str", "file_loc"
FOLDER_ID_COLUMNS = ("id_str", "id")
FOLDER_PATH_COLUMNS = ("file_loc", "path", "filename", "file")


@dataclass(frozen=True)
class FileItem:
    """One image file to read, with what the listing or catalog says of it."""

    id: str
    path: str
    source_row: int
    ra: float | None = None
    dec: float | None = None


class _FileInput(InputReader):
    """Inputs whose items are image files, decoded by ``pipeline.data.image_files`` under ``pixels``."""

    pixels: PixelsConfig

    def pixels_identity(self) -> str:
        """The rule's settings, part of the input identity: other settings give other pixels, so another run."""
        return stable_hash(self.pixels.model_dump())

    def _load(self, items: list[FileItem]) -> list[Record]:
        records = [Record(it.id, it.path, it.source_row, ra=it.ra, dec=it.dec) for it in items]
        for rec, image in zip(records, read_image_files([it.path for it in items], self.pixels)):
            if isinstance(image, np.ndarray):
                rec.image = image
            else:
                rec.error = error_text(image)
        return records


class FolderInput(_FileInput):
    """A directory of JPEG/PNG/FITS cutouts (searched recursively), or of the images listed by its one CSV.

    Without a CSV the id is the image's path relative to the folder, without its suffix (and, for a
    per-band FITS set, without its first band's ending; the other bands' files are read with it). With a CSV
    (exactly one ``*.csv`` at the top level) the id comes from ``id_str`` or ``id``, the path from
    ``file_loc``, ``path``, ``filename`` or ``file`` (relative to the folder), ra/dec when present.
    """

    kind: InputKind = "folder"

    def __init__(self, path: Path, pixels: PixelsConfig | None = None) -> None:
        self.path = Path(path)
        self.pixels = pixels or PixelsConfig()
        if not self.path.is_dir():
            raise DataError(f"{self.path}: image folder not found")
        csvs = sorted(self.path.glob("*.csv"))
        if len(csvs) > 1:
            raise DataError(
                f"{self.path}: {len(csvs)} CSV files ({', '.join(p.name for p in csvs)}); keep one, or pass the CSV "
                "itself as a Zoobot catalog (columns id_str, file_loc)"
            )
        self.table = (
            TableInput(csvs[0], base_dir=self.path, id_columns=FOLDER_ID_COLUMNS, path_columns=FOLDER_PATH_COLUMNS, pixels=self.pixels)
            if csvs
            else None
        )
        self._files: list[tuple[str, int, int, str]] | None = None

    def _listing(self) -> list[tuple[str, int, int, str]]:
        """(relative posix path, size, mtime_ns, error or "") of every cutout file, sorted so that chunking is stable.

        Listed once per reader (identity, count and items share it); hidden files and folders are skipped.
        An entry that cannot be read (a dangling link, an unreadable or repeated directory) is listed with its error.
        """
        if self._files is None:
            found: list[tuple[str, int, int, str]] = []
            stack = [("", str(self.path))]
            seen = {os.path.realpath(self.path)}
            while stack:
                prefix, directory = stack.pop()
                try:
                    with os.scandir(directory) as entries:
                        for e in sorted(entries, key=lambda e: e.name):  # which of two links is "repeated" must not vary
                            if not e.name.startswith("."):
                                self._list_entry(e, prefix, stack, seen, found)
                except OSError as exc:
                    found.append((prefix.rstrip("/") or ".", -1, 0, f"unreadable directory: {error_text(exc)}"))
            found.sort()
            self._files = found
        return self._files

    @staticmethod
    def _list_entry(e: os.DirEntry[str], prefix: str, stack: list[tuple[str, str]], seen: set[str], found: list[tuple[str, int, int, str]]) -> None:
        rel = prefix + e.name
        try:
            if e.is_dir():
                real = os.path.realpath(e.path)
                if real in seen:
                    found.append((rel, -1, 0, f"directory {real} is already listed (a link loop or a second link)"))
                else:
                    seen.add(real)
                    stack.append((rel + "/", e.path))
            elif e.name.lower().endswith(CUTOUT_SUFFIXES):
                st = e.stat()
                found.append((rel, st.st_size, st.st_mtime_ns, ""))
        except OSError as exc:
            found.append((rel, -1, 0, f"unreadable entry: {error_text(exc)}"))

    def _cutouts(self) -> list[tuple[str, str]]:
        """(relative path, error) of every item: a per-band FITS set is one item, named by its first band's file.

        Another band's file is read with its set; without its first band's file it is an item of its own (an error row).
        """
        listed = {rel for rel, *_ in self._listing()}
        keep = []
        for rel, _, _, error in self._listing():
            first = self._first_band(rel)
            if error or first == rel or first not in listed:
                keep.append((rel, error))
        return keep

    def _first_band(self, rel: str) -> str:
        """For a FITS file of a later band (``obj_r.fits``), its first band's file (``obj_g.fits``); else ``rel``."""
        ends = self.pixels.fits_band_files
        stem, suffix = split_suffix(rel)
        later = next((e for e in ends[1:] if stem.endswith(e)), None) if is_fits(rel) else None
        return rel if later is None else stem[: len(stem) - len(later)] + ends[0] + suffix

    def _item_id(self, rel: str) -> str:
        stem = split_suffix(rel)[0] or rel
        ends = self.pixels.fits_band_files
        if ends and is_fits(rel) and stem.endswith(ends[0]):
            stem = stem[: len(stem) - len(ends[0])]
        return stem

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}  # workers only decode items: never ship the listing to them

    @property
    def identity(self) -> dict[str, Any]:
        if self.table is not None:
            return {"kind": "folder", "catalog": self.table.identity}
        listing = stable_hash(self._listing())
        return {"kind": "folder", "path": str(self.path.resolve()), "listing": listing, "pixels": self.pixels_identity()}

    @property
    def num_items(self) -> int | None:
        if self.table is not None:
            return self.table.num_items
        return len(self._cutouts())

    def items(self) -> Iterator[FileItem | Record]:
        if self.table is not None:
            yield from self.table.items()
            return
        base = self.path.resolve()
        for row, (rel, error) in enumerate(self._cutouts()):
            if error:
                yield Record(self._item_id(rel), str(base / rel), row, error=error)
            else:
                yield FileItem(id=self._item_id(rel), path=str(base / rel), source_row=row)


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
        pixels: PixelsConfig | None = None,
    ) -> None:
        self.path = Path(path)
        self.pixels = pixels or PixelsConfig()
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
        return {"kind": "table", **stat_identity(self.path), "columns": [self.id_col, self.path_col], "pixels": self.pixels_identity()}

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

    def items(self) -> Iterator[FileItem | Record]:
        row = 0
        for batch in self._batches():
            cols = batch.to_pydict()
            for j in range(batch.num_rows):
                ident, loc = cols[self.id_col][j], cols[self.path_col][j]
                ident = f"{self.path.stem}-{row}" if ident is None else str(ident)
                if loc is None or str(loc).strip() == "":
                    yield Record(ident, str(self.path), row, error=f"catalog row has no {self.path_col}")
                else:
                    full = Path(str(loc)).expanduser()
                    full = full if full.is_absolute() else self.base_dir / full
                    ra = optional_float(cols["ra"][j]) if "ra" in cols else None
                    dec = optional_float(cols["dec"][j]) if "dec" in cols else None
                    yield FileItem(ident, str(full), row, ra, dec)
                row += 1

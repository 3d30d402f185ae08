"""A directory of JPEG/PNG/FITS cutouts plus a CSV catalog, as astronomers keep their own data.

Every problem that can be seen before reading pixels (missing columns, missing or unreadable files,
unknown labels, duplicate ids) is reported up front, so no output is started for a catalog that
cannot work. Pixels follow the rule predict uses (``data.folder.pixels``, docs/pixels.md); a file the
rule refuses stops ``prepare`` with one line naming it, because a training set must not silently
lose or distort rows.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from pipeline.config import FolderConfig, PixelsConfig
from pipeline.data.pixels import Geometry, PixelError, fits_band_paths, is_fits, read_cutout
from pipeline.data.record import RecordBatch
from pipeline.errors import DataError


def load_image(path: Path, *, geometry: Geometry = Geometry(), pixels: PixelsConfig | None = None) -> np.ndarray:
    """RGB uint8 HWC array under the pixel rule, then ``data.center_crop``/``data.resize``; errors name the file.

    The geometry is applied per file, before images of different sizes are stacked into a chunk.
    """
    try:
        return geometry.apply(read_cutout(path, pixels or PixelsConfig()))
    except PixelError as exc:
        raise DataError(f"{path}: {exc} (data.folder.pixels, docs/pixels.md)") from None
    except (UnidentifiedImageError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def _max_examples(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


class FolderSource:
    def __init__(self, root: str | Path, cfg: FolderConfig, *, class_names: Sequence[str], geometry: Geometry = Geometry()) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.geometry = geometry
        self.class_names = list(class_names)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data.path must be a directory of images for data.source=folder")
        catalog = Path(cfg.catalog)
        self.catalog = catalog if catalog.is_absolute() else self.root / catalog
        if not self.catalog.is_file():
            raise DataError(f"{self.catalog}: catalog CSV not found (data.folder.catalog)")
        self.ids, self.labels, self.paths, self.rows = self._read_catalog()
        self._shape = self._probe_shape()

    def _read_catalog(self) -> tuple[list[str], np.ndarray, list[Path], list[int]]:
        cfg = self.cfg
        with open(self.catalog, newline="", encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the header
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in (cfg.id_column, cfg.label_column, cfg.path_column) if c not in header]
            if missing:
                raise DataError(
                    f"{self.catalog}: column(s) {missing} not found (data.folder.*_column); the CSV has {header}"
                )
            rows = list(reader)
        if not rows:
            raise DataError(f"{self.catalog}: the catalog has no rows")
        name_to_label = {n: i for i, n in enumerate(self.class_names)}
        ids, labels, paths, bad_labels, missing_files, unopenable = [], [], [], [], [], []
        for line, row in enumerate(rows, start=2):
            raw = (row[cfg.label_column] or "").strip()
            if raw.lstrip("-").isdigit():
                label = int(raw)
            else:
                label = name_to_label.get(raw, -1)
            if not 0 <= label < len(self.class_names):
                bad_labels.append(f"line {line}: {raw!r}")
            path = Path(row[cfg.path_column])
            path = path if path.is_absolute() else self.catalog.parent / path
            if isinstance(error := self._open_error(path), FileNotFoundError):  # dangling links included
                missing_files.append(str(error.filename or path))
            elif error is not None:
                unopenable.append(f"{path} ({error.strerror if isinstance(error, OSError) else error})")
            ids.append(str(row[cfg.id_column]))
            labels.append(label)
            paths.append(path)
        if bad_labels:
            raise DataError(
                f"{self.catalog}: column {cfg.label_column!r} must be an integer in [0, {len(self.class_names)}) or one of "
                f"data.class_names; bad values at {_max_examples(bad_labels)}"
            )
        if missing_files:
            raise DataError(f"{self.catalog}: {len(missing_files)} listed image file(s) do not exist: {_max_examples(missing_files)}")
        if unopenable:
            raise DataError(f"{self.catalog}: {len(unopenable)} listed image file(s) cannot be opened: {_max_examples(unopenable)}")
        seen: set[str] = set()
        dupes = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        if dupes:
            raise DataError(f"{self.catalog}: column {cfg.id_column!r} must be unique; repeated: {_max_examples(dupes)}")
        return ids, np.asarray(labels, dtype=np.int64), paths, list(range(len(rows)))

    def _open_error(self, path: Path) -> OSError | PixelError | None:
        """Why a listed file (or one of its FITS band set) cannot be opened: missing, a dangling link, a directory."""
        try:
            for file in fits_band_paths(path, self.cfg.pixels) if is_fits(path) else [path]:
                with open(file, "rb"):
                    pass
        except (OSError, PixelError) as exc:
            return exc
        return None

    def _load(self, path: Path) -> np.ndarray:
        return load_image(path, geometry=self.geometry, pixels=self.cfg.pixels)

    def _probe_shape(self) -> tuple[int, int, int]:
        first = self._load(self.paths[0])
        return tuple(first.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def image_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "folder",
            "path": str(self.root.resolve()),
            "catalog": str(self.catalog.resolve()),
            "num_images": len(self),
            "center_crop": self.geometry.center_crop,
            "resize": self.geometry.resize,
        }

    def iter_batches(self, chunk_size: int) -> Iterator[RecordBatch]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for lo in range(0, len(self), chunk_size):
                hi = min(lo + chunk_size, len(self))
                images = list(pool.map(self._load, self.paths[lo:hi]))
                for path, img in zip(self.paths[lo:hi], images):
                    if img.shape != self._shape:
                        raise DataError(
                            f"{path}: image is {img.shape[1]}x{img.shape[0]} but the first image is "
                            f"{self._shape[1]}x{self._shape[0]}; set data.resize to make them equal"
                        )
                yield RecordBatch(
                    images=np.stack(images),
                    labels=self.labels[lo:hi],
                    ids=self.ids[lo:hi],
                    source_rows=np.arange(lo, hi, dtype=np.int64),
                )

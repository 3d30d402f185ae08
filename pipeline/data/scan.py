"""The scan ``validate`` runs: one streaming pass over the prepared file, every image reduced to per-row scalars.

Images never go to great-expectations: each becomes a few scalars (shape, dtype, blank, NaN count, duplicate of an
earlier row), so peak memory is one chunk of images whatever the file size.

Exact duplicates are found in two steps so that the scan is not bound by hashing speed (blake2b
runs at ~0.8 GB/s a core, well below the read speed of a cached file): a cheap vectorised fingerprint
of every image (wrapping sum and xor of its words; identical bytes always give identical fingerprints)
selects candidates, and only candidates are hashed with blake2b and compared. The result is the same
as hashing every image, because identical images always share a fingerprint: no duplicate is missed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import pandas as pd

from pipeline.data.prepare import PreparedDataset
from pipeline.progress import tqdm

_DIGEST_SIZE = 16


def image_chunks(images: h5py.Dataset, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, images[start:start + k])`` for consecutive chunks, all read into one reused buffer.

    Reusing the buffer spares the page faults of a fresh array per chunk (about a third of the read
    time of a cached file). A yielded array is valid only until the next one is requested. Reading
    ahead in a thread was measured slower on the 2-core machine, so there is none.
    """
    n = images.shape[0]
    buffer = np.empty((min(chunk_size, n), *images.shape[1:]), dtype=images.dtype)
    for lo in range(0, n, chunk_size):
        k = min(chunk_size, n - lo)
        images.read_direct(buffer, np.s_[lo : lo + k], np.s_[0:k])
        yield lo, buffer[:k]


@dataclass
class ChunkFingerprint:
    """Per-row wrapping sum and xor of a chunk's bytes read as the widest whole words.

    Identical bytes give identical fingerprints, so the fingerprint can only produce false candidates
    (confirmed or rejected afterwards), never miss a duplicate or a blank image. Both reductions are
    single vectorised passes, several times faster than hashing every image.
    """

    words: np.ndarray  # (k, m) unsigned view of the rows, no copy
    sums: np.ndarray  # (k,) uint64
    xors: np.ndarray  # (k,)

    @classmethod
    def of(cls, flat: np.ndarray) -> ChunkFingerprint:
        """``flat``: (k, nbytes) C-contiguous uint8, one row per image."""
        word = next(w for w in (8, 4, 2, 1) if flat.shape[1] % w == 0)
        words = flat.view(f"<u{word}")
        return cls(words, np.add.reduce(words, axis=1, dtype=np.uint64), np.bitwise_xor.reduce(words, axis=1))

    def keys(self) -> list[tuple[int, int]]:
        return list(zip(self.sums.tolist(), self.xors.tolist()))

    def constant_rows(self, values: np.ndarray) -> np.ndarray:
        """Rows of ``values`` (the same chunk, (k, n) of an integer dtype) whose values are all equal.

        Equal values repeat with the item size, which divides the word size, so a blank row is one
        word repeated, and its sum and xor follow from its first word. Only rows with that signature
        are compared value by value (an RGBA pixel repeated is one word repeated too, yet not blank).
        """
        k, m = self.words.shape
        out = np.zeros(k, dtype=bool)
        if m == 0:
            return out
        first = self.words[:, 0]
        expected_xor = first if m % 2 else np.zeros_like(first)
        signature = (self.sums == first.astype(np.uint64) * np.uint64(m)) & (self.xors == expected_xor)
        candidates = np.flatnonzero(signature)
        if candidates.size:
            rows = values[candidates]
            out[candidates] = (rows == rows[:, :1]).all(axis=1)
        return out


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).data, digest_size=_DIGEST_SIZE).digest()


class DuplicateFinder:
    """Exact duplicate images by content, streaming: row i is a duplicate if an earlier row has its bytes.

    Rows whose fingerprint repeats are hashed with blake2b and compared by digest. ``read_row(i)``
    re-reads an earlier row's bytes; it is only needed when a fingerprint repeats across chunks, and
    at most once per distinct content.
    """

    def __init__(self, read_row: Callable[[int], np.ndarray]) -> None:
        self._read_row = read_row
        # fingerprint -> [first row, its blake2b digest or None until needed], one per distinct content
        self._seen: dict[tuple[int, int], list[list[Any]]] = {}
        self.hashed = 0

    def add(self, start: int, flat: np.ndarray, fingerprint: ChunkFingerprint) -> np.ndarray:
        """Rows ``start..`` given as (k, nbytes) uint8; returns the earlier duplicated row of each, or -1."""
        out = np.full(flat.shape[0], -1, dtype=np.int64)
        for i, key in enumerate(fingerprint.keys()):
            entries = self._seen.get(key)
            if entries is None:
                self._seen[key] = [[start + i, None]]
                continue
            digest = _digest(flat[i])
            self.hashed += 1
            for entry in entries:
                if entry[1] is None:
                    first = entry[0]
                    row = flat[first - start] if first >= start else self._read_row(first)
                    entry[1] = _digest(row)
                    self.hashed += 1
                if entry[1] == digest:
                    out[i] = entry[0]
                    break
            else:
                entries.append([start + i, digest])
        return out


def _shape_facts(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(height, width, channels) of one image; a 2-D image has one channel."""
    height = shape[0] if len(shape) > 0 else 0
    width = shape[1] if len(shape) > 1 else 0
    channels = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return int(height), int(width), channels


def scan(prepared: PreparedDataset, chunk_size: int, *, progress: bool = True) -> pd.DataFrame:
    """One pass over the prepared file -> one row of scalars per image (no pixels), index = file position.

    Images stream through in chunks; the scalar columns (labels, ids, coordinates) are small and read whole.
    """
    n = prepared.num_images
    height, width, channels = _shape_facts(prepared.image_shape)
    with prepared.file.open() as h5:
        images = h5["images"]
        dtype = images.dtype
        finder = DuplicateFinder(lambda i: images[i].reshape(-1).view(np.uint8))
        is_constant = np.zeros(n, dtype=bool)
        nan_count = np.zeros(n, dtype=np.int64)
        duplicate_of = np.full(n, -1, dtype=np.int64)
        with tqdm(total=n, desc="validate", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for lo, chunk in image_chunks(images, chunk_size):
                k = len(chunk)
                rows = slice(lo, lo + k)
                pixels = chunk.reshape(k, -1)
                flat = pixels.view(np.uint8).reshape(k, -1)
                fingerprint = ChunkFingerprint.of(flat)
                if dtype.kind in "fc":
                    # By value, not bytes: 0.0 == -0.0, and an image with NaN is not blank but NaN.
                    is_constant[rows] = pixels.max(axis=1) == pixels.min(axis=1)
                    nan_count[rows] = np.count_nonzero(np.isnan(pixels), axis=1)
                else:
                    is_constant[rows] = fingerprint.constant_rows(pixels)
                duplicate_of[rows] = finder.add(lo, flat, fingerprint)
                bar.update(k)
    frame = pd.DataFrame(
        {
            "label": prepared.read_column("label").astype(np.int64),
            "id": pd.Series(prepared.read_column("id"), dtype=object),
            **{name: prepared.read_column(name).astype(np.float64) for name in ("ra", "dec", "redshift")},
            "height": np.full(n, height, dtype=np.int64),
            "width": np.full(n, width, dtype=np.int64),
            "channels": np.full(n, channels, dtype=np.int64),
            "dtype": pd.Series([dtype.name] * n, dtype=object),
            "is_constant": is_constant,
            "nan_count": nan_count,
            "is_duplicate": duplicate_of >= 0,
            "duplicate_of": duplicate_of,
        }
    )
    frame.attrs["hashed_images"] = finder.hashed
    return frame

"""Predict's ``shards`` input: our WebDataset shards, indexed by member offset through :mod:`pipeline.data.reader`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.catalog.inputs.base import InputKind, InputReader, stat_identity
from pipeline.data.reader import ShardItem, index_shard, read_items
from pipeline.data.record import Record
from pipeline.data.shards import MANIFEST, SPLITS
from pipeline.errors import DataError
from pipeline.io import read_json


class ShardsInput(InputReader):
    """One ``.tar``, a directory of them, or a sharded data set's splits (``docs/design.md``), read at random by workers.

    With a manifest, the identity is the shards' SHA256 (path-independent) and a shard with fewer samples than
    the manifest lists reports the missing ones; without, the identity is every tar's path, size and mtime.
    """

    kind: InputKind = "shards"
    prepared = True

    def __init__(self, path: Path, splits: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._expected: dict[str, int] = {}
        self._sha: dict[str, str] = {}
        self._split_counts: dict[str, int] = {}
        if self.path.is_file():
            self.tars = [self.path.resolve()]
        elif (self.path / MANIFEST).is_file():
            self.tars = self._from_manifest(read_json(self.path / MANIFEST), splits)
        elif self.path.is_dir():
            self.tars = sorted(p.resolve() for p in self.path.glob("*.tar"))
        else:
            raise DataError(f"{self.path}: shard input not found")
        if not self.tars:
            raise DataError(f"{self.path}: no .tar shards found")

    def _from_manifest(self, manifest: dict[str, Any], splits: Sequence[str] | None) -> list[Path]:
        """The shards of ``splits`` (default: every split, in train/val/test order), noting their hashes and counts."""
        names = list(splits) if splits else [s for s in SPLITS if s in manifest["splits"]] or list(manifest["splits"])
        missing = [s for s in names if s not in manifest["splits"]]
        if missing:
            raise DataError(f"{self.path / MANIFEST}: no split(s) {missing}; have {sorted(manifest['splits'])}")
        tars = []
        for split in names:
            for s in manifest["splits"][split]["shards"]:
                tar = (self.path / s["name"]).resolve()
                tars.append(tar)
                self._sha[str(tar)] = s["sha256"]
                if s.get("num_samples") is not None:
                    self._expected[str(tar)] = int(s["num_samples"])
        self._split_counts = {s: int(manifest["splits"][s]["num_samples"]) for s in names}
        return tars

    @property
    def identity(self) -> dict[str, Any]:
        shards: list[dict[str, Any]] = []
        for tar in self.tars:
            if str(tar) in self._sha:
                shards.append({"sha256": self._sha[str(tar)]})
            elif tar.is_file():
                shards.append(stat_identity(tar))
            else:
                shards.append({"path": str(tar), "missing": True})
        return {"kind": "shards", "shards": shards}

    @property
    def num_items(self) -> int | None:
        return sum(self._split_counts.values()) if self._split_counts else None

    def items(self) -> Iterator[ShardItem | Record]:
        for tar in self.tars:
            yield from index_shard(tar, self._expected.get(str(tar)))

    def _load(self, items: list[ShardItem]) -> list[Record]:
        return read_items(items)

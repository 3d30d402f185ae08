"""Where each stage reads and writes, relative to one working directory.

The CLI and DVC use the fixed layout below; flows point each stage at a content-addressed
directory instead (``flows/cache.py``). Stage functions take explicit directories, never this object,
so both callers share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def validation(self) -> Path:
        return self.root / "data" / "validation"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards"

    @property
    def train(self) -> Path:
        return self.root / "data" / "train"

    @property
    def calibration_file(self) -> Path:
        return self.root / "data" / "calibration" / "calibration.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "data" / "eval"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def resolve(self, path: str | Path) -> Path:
        """Config paths are relative to the working directory unless absolute."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path

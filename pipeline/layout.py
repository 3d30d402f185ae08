"""Where each stage reads and writes: the workspace layout, and what a stage function is handed.

The CLI and ``dvc repro`` work in the fixed workspace directories below; the flows hand each stage a
directory of the content-addressed store instead (``pipeline.orchestrate.store``). Stage functions
take a :class:`StageRun` naming their directories, never a layout, so every caller shares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config

STAGE_DIRS: dict[str, str] = {
    "prepare": "data/prepared",
    "validate": "data/validation",
    "shard": "data/shards",
    "train": "data/train",
    "calibrate": "data/calibration",
    "evaluate": "data/eval",
    "predict": "data/catalog",
}
"""Each stage's workspace directory, relative to the workdir (the DVC outputs live in or are these)."""


@dataclass(frozen=True)
class Layout:
    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    @property
    def prepared(self) -> Path:
        return self.stage_dir("prepare")

    @property
    def validation(self) -> Path:
        return self.stage_dir("validate")

    @property
    def shards(self) -> Path:
        return self.stage_dir("shard")

    @property
    def train(self) -> Path:
        return self.stage_dir("train")

    @property
    def calibration_file(self) -> Path:
        return self.stage_dir("calibrate") / "calibration.json"

    @property
    def evaluation(self) -> Path:
        return self.stage_dir("evaluate")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def resolve(self, path: str | Path) -> Path:
        """Config paths are relative to the working directory unless absolute."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path


@dataclass(frozen=True)
class StageRun:
    """One stage invocation: its config, its own directory, its upstream stages' directories."""

    cfg: Config
    out: Path
    inputs: Mapping[str, Path]
    workdir: Path
    progress: bool = True
    resume: bool = False
    summary_file: Path | None = None
    """A workspace file outside ``out`` that DVC reads as metrics (None inside the store)."""
    isolate: bool = False
    """Run heavy work in a child process (the flows do, so a crash cannot take the orchestrator down)."""

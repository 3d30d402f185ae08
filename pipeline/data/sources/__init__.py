"""Input kinds. Each module yields :class:`RecordBatch` chunks; ``open_source`` picks one from config."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.record import RecordBatch
from pipeline.data.sources.base import Source

__all__ = ["RecordBatch", "Source", "open_source"]


def open_source(data: DataConfig, *, workdir: Path = Path("."), progress: bool = True) -> Source:
    """The configured source, opened and schema-checked (errors name the file and the field)."""
    from pipeline.layout import Layout

    layout = Layout(Path(workdir))
    if data.source == "synthetic":
        from pipeline.data.sources.synthetic_source import SyntheticSource

        return SyntheticSource(data)
    if data.source == "h5":
        from pipeline.data.sources.h5 import H5Source

        return H5Source(layout.resolve(data.path), class_names=data.class_names)
    if data.source == "galaxy10":
        from pipeline.data.sources.galaxy10 import ensure_galaxy10
        from pipeline.data.sources.h5 import H5Source

        path = ensure_galaxy10(data, layout, progress=progress)
        return H5Source(path, class_names=data.class_names)
    if data.source == "folder":
        from pipeline.data.sources.folder import FolderSource

        return FolderSource(layout.resolve(data.path), data.folder, class_names=data.class_names)
    raise ValueError(f"unknown data.source {data.source!r}")

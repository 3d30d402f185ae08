"""Input kinds. Each module yields :class:`RecordBatch` chunks; ``open_source`` picks one from config."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.pixels import Geometry
from pipeline.data.record import RecordBatch
from pipeline.data.sources.base import CroppedSource, Source

__all__ = ["RecordBatch", "Source", "open_source"]


def open_source(data: DataConfig, *, workdir: Path = Path("."), progress: bool = True) -> Source:
    """The configured source, opened and schema-checked (errors name the file and the field).

    Its images come with ``data.center_crop`` and ``data.resize`` applied, whatever the source.
    """
    geometry = Geometry.of(data)
    if data.source == "folder":
        from pipeline.data.sources.folder import FolderSource
        from pipeline.layout import Layout

        path = Layout(Path(workdir)).resolve(data.path)
        return FolderSource(path, data.folder, class_names=data.class_names, geometry=geometry)
    source = _open_arrays(data, Path(workdir), progress)
    return CroppedSource(source, geometry) if geometry else source


def _open_arrays(data: DataConfig, workdir: Path, progress: bool) -> Source:
    """The sources that yield whole arrays (synthetic, h5, galaxy10), before the crop."""
    from pipeline.layout import Layout

    layout = Layout(workdir)
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
    raise ValueError(f"unknown data.source {data.source!r}")

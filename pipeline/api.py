"""The Python API: a trained model in one call, classifications as a DataFrame, training from a config.

A handful of names, in the spirit of Zoobot's ``predict_on_catalog`` (``docs/api.md``)::

    from pipeline.api import load_model, train
    clf = load_model("production")               # or a model id in the registry, or a checkpoint path
    df = clf.predict(images)                     # (N, H, W, 3) uint8 cutouts
    df = clf.predict_catalog(catalog)            # Zoobot convention: id_str, file_loc (+ ra, dec)
    df = clf.predict_input("survey.h5")          # anything `astroflow predict --input` reads

Scoring is the catalog's own: the checkpoint is read by :class:`~pipeline.score.trained_model.TrainedModel`,
the calibration found and checked by :func:`pipeline.catalog.predict.resolve_calibration`, and the images
decoded, checked, preprocessed, scored and turned into rows by :mod:`pipeline.catalog.classify`, exactly
as ``astroflow predict`` does; so a DataFrame from here has the catalog's columns (``docs/catalog.md``,
without the ``run`` partition) and the same values (tested).
"""

from __future__ import annotations

import datetime as dt
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.catalog.classify import classify_items
from pipeline.catalog.inputs import InputReader, TableInput, open_input
from pipeline.catalog.predict import resolve_calibration
from pipeline.config import Config, PixelsConfig, load_config
from pipeline.data.record import Record, optional_float
from pipeline.errors import ConfigError, DataError
from pipeline.layout import Layout
from pipeline.runtime import resolve_device
from pipeline.score import registry as reg
from pipeline.score.trained_model import TorchBackend, TrainedModel

__all__ = ["Classifier", "load_model", "resolve_checkpoint", "train"]

ARRAY_SOURCE = "<array>"
"""``source_file`` of rows classified from in-memory arrays."""


def resolve_checkpoint(model: str | Path, registry: str | Path = "registry") -> Path:
    """The checkpoint that ``model`` names: a checkpoint file, ``"production"``, or a model id in ``registry``."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    root = Path(registry)
    if str(model) == reg.PRODUCTION:
        return reg.production_checkpoint(root)
    candidate = reg.candidate_dir(root, str(model)) / reg.MODEL_FILE
    if candidate.is_file():
        return candidate
    raise DataError(f"{model}: neither a checkpoint file nor 'production' or a model id registered in {root}")


class _ArrayInput(InputReader):
    """In-memory cutouts as a predict input: item ``i`` is image ``i``."""

    def __init__(self, images: Any, ids: Sequence[Any] | None, ra: Sequence[Any] | None, dec: Sequence[Any] | None) -> None:
        self.images = images
        n = len(images)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]
        self.ra = list(ra) if ra is not None else [None] * n
        self.dec = list(dec) if dec is not None else [None] * n
        if not len(self.ids) == len(self.ra) == len(self.dec) == n:
            raise DataError(f"ids, ra and dec must have one value per image ({n})")
        self.path = Path(ARRAY_SOURCE)

    @property
    def num_items(self) -> int:
        return len(self.images)

    def items(self) -> list[int]:
        return list(range(len(self.images)))

    def _load(self, items: list[int]) -> list[Record]:
        return [
            Record(self.ids[i], ARRAY_SOURCE, i, ra=optional_float(self.ra[i]), dec=optional_float(self.dec[i]), image=np.asarray(self.images[i]))
            for i in items
        ]


class Classifier:
    """A trained model with its calibration, ready to classify: what ``astroflow predict`` scores with."""

    def __init__(
        self, model: TrainedModel, temperature: float, calibration: str, *, tta: bool = False, device: str = "cpu",
        batch_size: int = 64, amp: str = "none", pixels: PixelsConfig | None = None,
    ) -> None:
        self.model = model
        self.pixels = pixels or PixelsConfig()
        self.temperature = temperature
        self.calibration = calibration
        self.tta = tta
        self.batch_size = batch_size
        self.backend = TorchBackend(model.network, resolve_device(device, "device"), amp)

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def predict(
        self, images: Any, *, ids: Sequence[Any] | None = None, ra: Sequence[Any] | None = None, dec: Sequence[Any] | None = None
    ) -> pd.DataFrame:
        """Classify square RGB uint8 cutouts, an (N, H, W, 3) array or a sequence of (H, W, 3) arrays.

        Ids default to the position; ``source_file`` is ``<array>`` and ``source_row`` the position.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        return self._classify(_ArrayInput(images, ids, ra, dec))

    def predict_files(self, paths: Sequence[str | Path], *, ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """Classify JPEG/PNG files; ids default to the file names without suffix."""
        ids = list(ids) if ids is not None else [Path(p).stem for p in paths]
        return self.predict_catalog(pd.DataFrame({"id_str": ids, "file_loc": [str(Path(p).resolve()) for p in paths]}))

    def predict_catalog(self, catalog: pd.DataFrame, *, base_dir: str | Path | None = None) -> pd.DataFrame:
        """Classify a Zoobot-convention catalog: ``id_str`` and ``file_loc`` (relative to ``base_dir``, default the
        current directory), optional ``ra``/``dec``; read exactly as ``astroflow predict`` reads such a file."""
        missing = [c for c in ("id_str", "file_loc") if c not in catalog.columns]
        if missing:
            raise DataError(f"catalog: column(s) {missing} missing; have {list(catalog.columns)}")
        columns = [c for c in ("id_str", "file_loc", "ra", "dec") if c in catalog.columns]
        table = catalog[columns].astype({"id_str": str, "file_loc": str})
        with tempfile.TemporaryDirectory(prefix="astroflow-api-") as tmp:
            path = Path(tmp) / "catalog.parquet"
            table.to_parquet(path, index=False)
            return self._classify(TableInput(path, base_dir=Path(base_dir or Path.cwd()), pixels=self.pixels))

    def predict_input(self, path: str | Path, *, kind: str = "auto") -> pd.DataFrame:
        """Classify anything ``astroflow predict --input`` reads: HDF5, shards, an image folder, a catalog file."""
        return self._classify(open_input(Path(path).resolve(), kind, pixels=self.pixels))

    def _classify(self, reader: InputReader) -> pd.DataFrame:
        """The catalog rows of every item; unreadable images are left out, listed in ``df.attrs["errors"]`` and warned about."""
        const = {"model_id": self.model_id, "tta": self.tta, "temperature": self.temperature, "run_ts": dt.datetime.now(dt.UTC)}
        try:
            items = list(reader.items())
            rows, errors, bad_coords = classify_items(
                reader, items, self.model, self.backend, batch_size=self.batch_size, tta=self.tta, const=const
            )
        finally:
            reader.close()
        df = rows.to_pandas()
        df.attrs["errors"] = errors.to_pandas()
        df.attrs["num_coords_out_of_range"] = bad_coords
        if errors.num_rows:
            warnings.warn(f"{errors.num_rows} image(s) could not be classified; see df.attrs['errors']", stacklevel=3)
        return df


def load_model(
    model: str | Path = reg.PRODUCTION,
    *,
    registry: str | Path = "registry",
    calibration: str | Path | None = None,
    tta: bool = False,
    device: str = "cpu",
    batch_size: int = 64,
    amp: str = "none",
    pixels: PixelsConfig | None = None,
) -> Classifier:
    """A :class:`Classifier` for ``model`` (a checkpoint path, ``"production"`` or a registered model id).

    The temperature comes from ``calibration``, else ``calibration.json`` beside the checkpoint (the
    registry keeps one per model), else 1, under the same contract ``predict`` enforces. ``pixels`` is the
    pixel rule for image files (``data.folder.pixels`` of the training config; default settings if None).
    """
    trained = TrainedModel.load(resolve_checkpoint(model, registry))
    temperature, source = resolve_calibration(Path(calibration) if calibration is not None else None, trained, tta)
    return Classifier(trained, temperature, source, tta=tta, device=device, batch_size=batch_size, amp=amp, pixels=pixels)


def train(
    params: str | Path | Config | None = None,
    *,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
    finetune_from: str | Path | None = None,
    registry: str | Path = "registry",
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Prepare, validate, shard, train, calibrate and evaluate under ``workdir``, as ``astroflow run`` does (without predict).

    ``finetune_from`` (a checkpoint path, ``"production"`` or a model id) starts from those weights
    (``model.pretrained``); the classifier is kept when the classes match. Returns the stage summaries and
    ``checkpoint``, which :func:`load_model` takes.
    """
    from pipeline.learn.train import BEST
    from pipeline.orchestrate.graph import STAGES
    from pipeline.orchestrate.runner import refuse_overwrite, run_in_workspace

    if isinstance(params, Config):
        if overrides:
            raise ConfigError("overrides apply to a params file; set the fields of a Config object directly")
        cfg = params.model_copy(deep=True)
    else:
        cfg = load_config(params, list(overrides))
    if finetune_from is not None:
        cfg.model.pretrained = str(resolve_checkpoint(finetune_from, registry).resolve())
    layout = Layout(Path(workdir).resolve())
    stages = [s.name for s in STAGES if s.name != "predict"]
    for name in stages:
        refuse_overwrite(name, layout, resume=resume, force=force)
    summaries = {name: run_in_workspace(name, cfg, layout, progress=progress, resume=resume, force=force).summary for name in stages}
    return {**summaries, "checkpoint": str(layout.train / BEST)}

"""A trained model loaded once: where a checkpoint becomes probabilities.

:class:`TrainedModel` reads the checkpoint file once and holds everything scoring needs: the network,
the config it was trained with (its preprocessing), its model id, its class names and the calibration
contract. ``calibrate``, ``evaluate``, ``predict``, ``export`` and the registry's re-scoring all score
through it, so they cannot disagree on any of these rules:

- **Scores** (:func:`scores`): the logits, or with test-time augmentation the log of the mean probability
  over the exact views of the symmetry the model was trained with (:meth:`TrainedModel.tta_views`:
  4 rotations for ``train.rotation: rot90`` without ``hflip``, the 8 rotations/flips for ``d4`` or with ``hflip``).
- **Raw inputs** (:attr:`TrainedModel.geometry`): image files and HDF5 cutouts get the training config's
  ``data.center_crop`` and ``data.resize`` before the model's own resize, as ``prepare`` gave its training images.
- **Temperature**: probabilities are ``softmax(scores / T)`` (:func:`pipeline.score.metrics.softmax`), the
  function ``calibrate`` fits ``T`` for.
- **Calibration contract** (:meth:`TrainedModel.temperature`): a calibration file must name this model's id
  and the TTA setting its temperature was fitted with; a file naming no id, another id or another TTA
  setting is refused (a file with ``enabled: false`` holds T = 1, which fits any TTA setting).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.pixels import Geometry
from pipeline.data.transforms import tta_group, tta_views
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.io import read_json
from pipeline.learn.checkpoint import build_model, checkpoint_config, read_checkpoint
from pipeline.score import metrics as M

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
LEGACY_PIXEL_GEOMETRY = ("center_crop", "resize")  # data.folder's pixel crop/resize, replaced by data.center_crop/resize
log = logging.getLogger(__name__)
TTAGroup = Sequence[tuple[bool, int]]


def _current_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config without ``data.folder.center_crop``/``resize``: checkpoints from before ``data.center_crop``
    still load, with no crop on raw inputs (what predict gave them then)."""
    folder = raw.get("data", {}).get("folder") if isinstance(raw.get("data"), dict) else None
    if not isinstance(folder, dict) or not any(k in folder for k in LEGACY_PIXEL_GEOMETRY):
        return raw
    folder = {k: v for k, v in folder.items() if k not in LEGACY_PIXEL_GEOMETRY}
    return {**raw, "data": {**raw["data"], "folder": folder}}


class TrainedModel:
    """One checkpoint, read once: network (built on first use), config, model id, classes, calibration rule."""

    def __init__(self, path: Path, payload: dict[str, Any], model_id: str) -> None:
        self.path = path
        self.model_id = model_id
        self.model_name = str(payload["model_name"])
        self.class_names = list(payload["class_names"])
        self.img_size = int(payload["img_size"])
        self.config: Config = checkpoint_config({**payload, "config": _current_config(payload["config"])}, path)
        self._payload = payload

    @classmethod
    def load(cls, path: str | Path) -> TrainedModel:
        """The model of checkpoint ``path`` (a ``CheckpointError`` names what is wrong with the file)."""
        payload, mid = read_checkpoint(path)
        return cls(Path(path), payload, mid)

    @property
    def input_range(self) -> str:
        """The input normalisation the network was trained on: scoring must use the same."""
        return self.config.train.input_range

    @property
    def geometry(self) -> Geometry:
        """The crop and resize ``prepare`` gave the training images: predict applies them to raw inputs."""
        return Geometry.of(self.config.data)

    @property
    def symmetry(self) -> TTAGroup:
        """The exact views training's augmentation made equivalent (``train.rotation``, ``train.hflip``)."""
        return tta_group(self.config.train.rotation, self.config.train.hflip)

    def num_views(self, tta: bool) -> int:
        """How many views a score averages (1 without TTA): recorded next to the ``tta`` flag."""
        return len(self.symmetry) if tta else 1

    def tta_views(self, tta: bool) -> TTAGroup:
        """The views test-time augmentation averages: the training symmetry, or none without TTA."""
        if not tta:
            return ()
        group = self.symmetry
        if len(group) == 1:
            log.warning("TTA is a no-op for model %s: it was trained with train.rotation=none and hflip=false", self.model_id)
        return group

    @cached_property
    def network(self) -> torch.nn.Module:
        """The network with its weights, in eval mode; built on first use, so forked workers never carry it."""
        return build_model(self._payload, path=self.path)

    def check_classes(self, class_names: list[str], where: str | Path) -> None:
        """Refuse data whose class names (or their order) differ from the model's: its labels would mean other classes."""
        if list(class_names) != self.class_names:
            raise DataError(f"{where}: has class_names {list(class_names)} but model {self.model_id} was trained on {self.class_names}")

    def temperature(self, path: str | Path, *, tta: bool) -> float:
        """The temperature of calibration file ``path`` under the calibration contract (module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: calibration file not found (run `astroflow calibrate` first)")
        cal = read_json(path)
        cal = cal if isinstance(cal, dict) else {}
        t = cal.get("temperature")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise DataError(f"{path}: field 'temperature' must be a positive number, got {t!r}")
        if cal.get("model_id") != self.model_id:
            raise CheckpointError(
                f"{path}: calibration is for model {cal.get('model_id')!r}, not {self.model_id!r}; re-run calibrate"
            )
        if not isinstance(cal.get("tta"), bool):
            raise DataError(f"{path}: field 'tta' must say whether the temperature was fitted with TTA, got {cal.get('tta')!r}")
        if cal.get("enabled", True) and cal["tta"] != tta:
            raise ConfigError(f"{path}: temperature was fitted with tta={cal['tta']} but this scoring has tta={tta}; re-run calibrate")
        return float(t)


class TorchBackend:
    """The network on ``device``, optionally under autocast (``amp``: ``bf16``, ``fp16`` or ``none``)."""

    def __init__(self, network: torch.nn.Module, device: torch.device, amp: str = "none") -> None:
        self.network = network.to(device).eval()
        self.device = device
        self.amp = amp

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        amp = _AMP.get(self.amp)
        ctx = torch.autocast(self.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            return self.network(x).float()


class OnnxBackend:
    """An ONNX export of the model under onnxruntime (CUDA when ``device`` is and the provider exists)."""

    def __init__(self, path: Path, device: torch.device, threads: int = 0) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.contiguous().numpy()})[0]
        return torch.from_numpy(out).float()


Backend = TorchBackend | OnnxBackend


def scores(backend: Backend, x: torch.Tensor, *, tta: TTAGroup) -> torch.Tensor:
    """Float32 scores of a preprocessed batch: logits, or with TTA the log mean probability over the views ``tta``
    (:meth:`TrainedModel.tta_views`; empty: no TTA).

    These are what a temperature divides: ``calibrate`` fits it on them and every consumer applies it to them.
    """
    x = backend.to_device(x)
    if not tta:
        return backend.logits(x)
    views = torch.stack([backend.logits(v).log_softmax(dim=1) for v in tta_views(x, tta)])
    return torch.logsumexp(views, dim=0) - math.log(len(views))


def probabilities(backend: Backend, x: torch.Tensor, *, tta: TTAGroup, temperature: float) -> np.ndarray:
    """Calibrated class probabilities (float64) of a preprocessed batch: ``softmax(scores / T)``."""
    return M.softmax(scores(backend, x, tta=tta).cpu(), temperature)

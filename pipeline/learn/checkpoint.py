"""Checkpoints: atomic to write, safe to load (``weights_only=True``), clear about what is wrong.

A checkpoint is a plain dict of tensors and JSON-like values (see ``docs/design.md``):
``format``, ``model`` (state dict), ``config`` (the full config as a dict), ``class_names``,
``model_name``, ``img_size``, ``epoch``, ``metrics``; training checkpoints add the resume state
(``optimizer``, ``scheduler``, ``scaler``, ``ema``, ``rng``, ...).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, config_from_dict, stable_hash
from pipeline.errors import CheckpointError
from pipeline.io import atomic_write_bytes

FORMAT = "astroflow-checkpoint-v1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise in memory, then write atomically: a kill never leaves a truncated checkpoint."""
    payload = {"format": FORMAT, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """(payload, model id) from one read of the file: the id hashes the very bytes that were loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    payload = _parse(data, path, map_location)
    h = hashlib.sha256(data).hexdigest()[:16]
    return payload, f"{payload['model_name']}-{stable_hash({'weights': h, 'config': payload['config']})}"


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return read_checkpoint(path, map_location=map_location)[0]


def _parse(data: bytes, path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused it: never pass on torch's advice to load it unsafely
        raise CheckpointError(f"{path}: refused by the safe loader: not only tensors and plain values ({_refusal(exc)})") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: field 'format' must be {FORMAT!r}, got {got!r}")
    for key in ("model", "config", "class_names", "model_name", "img_size"):
        if key not in payload:
            raise CheckpointError(f"{path}: field {key!r} missing")
    return payload


def _refusal(exc: Exception) -> str:
    """What ``weights_only`` found, without the paragraphs around it that suggest ``weights_only=False``."""
    advice = ("Weights only load failed", "Check the documentation", "In PyTorch")
    lines = [line.strip() for line in str(exc).splitlines()]
    found = [line for line in lines if line and not line.startswith(advice) and "weights_only" not in line]
    return " ".join(found) or "an object weights_only does not allow"


def checkpoint_config(payload: dict[str, Any], path: str | Path = "<checkpoint>") -> Config:
    try:
        return config_from_dict(payload["config"], f"{path} config")
    except Exception as exc:
        raise CheckpointError(f"{path}: stored config is invalid: {exc}") from None


def model_id(path: str | Path) -> str:
    """Identity of a trained model: hash of the checkpoint's weights file and its config."""
    return read_checkpoint(path)[1]


def build_model(payload: dict[str, Any], *, path: str | Path = "<checkpoint>") -> torch.nn.Module:
    """The network described by a checkpoint, with its weights loaded, in eval mode."""
    from models.factory import create_model  # importing it registers the Astroformer family in timm

    model = create_model(
        payload["model_name"], num_classes=len(payload["class_names"]), img_size=int(payload["img_size"])
    )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not match model {payload['model_name']!r} with "
            f"{len(payload['class_names'])} classes at img_size {payload['img_size']}: {str(exc)[:300]}"
        ) from None
    return model.eval()


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """(model in eval mode, its training config, the raw payload) from a checkpoint file."""
    payload = load_checkpoint(path, map_location=map_location)
    return build_model(payload, path=path), checkpoint_config(payload, path), payload


def check_compatible(
    payload: dict[str, Any], *, model_name: str, class_names: list[str], img_size: int, path: str | Path = "<checkpoint>"
) -> None:
    """Refuse to resume from a checkpoint of another model, class list or input size, naming the difference."""
    expected = {"model_name": model_name, "class_names": list(class_names), "img_size": int(img_size)}
    for key, want in expected.items():
        got = payload.get(key)
        if key == "img_size":
            got = int(got) if isinstance(got, (int, float)) else got
        elif key == "class_names":
            got = list(got) if isinstance(got, (list, tuple)) else got
        if got != want:
            raise CheckpointError(f"{path}: field {key!r} is {got!r}, but this run is configured for {want!r}")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states as tensors and ints, so ``weights_only`` loads them."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe(payload: dict[str, Any]) -> str:
    return json.dumps({k: payload[k] for k in ("model_name", "img_size", "class_names", "epoch") if k in payload})

"""Shared test fixtures: small generated inputs in the Galaxy10 schema (tests never use real survey data)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def make_galaxy10_h5(
    path: Path,
    n: int = 60,
    *,
    size: int = 16,
    num_classes: int = 10,
    seed: int = 0,
    with_coords: bool = True,
    compression: str | None = None,
) -> dict[str, np.ndarray]:
    """Write a small file with exactly the Galaxy10 DECals schema; every class present; distinct images."""
    rng = np.random.default_rng(seed)
    data = {
        "images": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
        "ans": (np.arange(n) % num_classes).astype(np.uint8),
    }
    if with_coords:
        data["ra"] = rng.uniform(0, 360, n)
        data["dec"] = rng.uniform(-90, 90, n)
        data["redshift"] = rng.uniform(0, 0.3, n)
        data["pxscale"] = np.full(n, 0.262)
    with h5py.File(path, "w") as h5:
        for key, value in data.items():
            if key == "images":
                h5.create_dataset(key, data=value, chunks=(1, size, size, 3), compression=compression)
            else:
                h5.create_dataset(key, data=value)
    return data


@pytest.fixture
def galaxy10_h5(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "g10.h5"
    return path, make_galaxy10_h5(path)


def h5_overrides(path: Path, size: int = 16) -> list[str]:
    return [
        "data.source=h5",
        f"data.path={path}",
        f"validate.image_shape=[{size},{size},3]",
        "shard.max_samples_per_shard=20",
    ]

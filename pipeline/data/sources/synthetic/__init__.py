"""Deterministic Galaxy10-DECals-like images: the project's built-in offline data set.

Why: the real Galaxy10 DECals file is 2.7 GB and needs the network, but every stage
(ingest, validation, sharding, training, inference) must be runnable and testable offline.
Images are rendered from simple physical recipes (Sersic bulges, exponential disks, log
spiral arms, bars, tidal tails, clumps) so a CNN has real morphology to learn, with enough
parameter overlap between neighbouring classes that the task is not trivial.

This module is the data-set API (rows, labels, the HDF5 file, a preview); :mod:`.recipes` holds the
class recipes and :mod:`.scene` the rendering they draw with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.config import GALAXY10_CLASS_NAMES
from pipeline.data.h5 import H5Writer
from pipeline.data.record import OPTIONAL_FLOAT_FIELDS
from pipeline.data.sources.synthetic.recipes import MIN_SIZE, NUM_CLASSES, render_galaxy
from pipeline.data.sources.synthetic.scene import REF_SIZE

CLASS_NAMES: tuple[str, ...] = GALAXY10_CLASS_NAMES
GALAXY10_COUNTS: tuple[int, ...] = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)
PXSCALE: float = 0.262  # arcsec / px, DECals

__all__ = [
    "CLASS_NAMES", "GALAXY10_COUNTS", "NUM_CLASSES", "PXSCALE",
    "draw_labels", "generate_arrays", "preview_grid", "render_galaxy", "write_synthetic_h5",
]


def _label_cdf(class_weights: Sequence[float] | None) -> np.ndarray:
    w = np.asarray(GALAXY10_COUNTS if class_weights is None else class_weights, dtype=np.float64)
    if w.shape != (NUM_CLASSES,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"class_weights must be {NUM_CLASSES} finite non-negative numbers with a positive sum, got {class_weights!r}")
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    return cdf


def _row_rng(seed: int, i: int) -> np.random.Generator:
    """Row i's generator depends only on (seed, i): chunked and one-shot generation agree."""
    return np.random.default_rng([seed, i])


def _row_label(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """The first draw of every row is its label, so labels can be drawn without rendering."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), NUM_CLASSES - 1)


def _check_args(n: int, seed: int, start: int, size: int = MIN_SIZE) -> None:
    if n < 0 or start < 0 or seed < 0:
        raise ValueError(f"n, start and seed must be >= 0, got n={n}, start={start}, seed={seed}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")


def draw_labels(n: int, *, seed: int = 0, start: int = 0, class_weights: Sequence[float] | None = None) -> np.ndarray:
    """Labels of rows start..start+n, identical to ``generate_arrays(...)["label"]`` but without rendering."""
    _check_args(n, seed, start)
    cdf = _label_cdf(class_weights)
    return np.array([_row_label(_row_rng(seed, i), cdf) for i in range(start, start + n)], dtype=np.uint8)


def generate_arrays(
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    start: int = 0,
    class_weights: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Rows start..start+n of the deterministic synthetic sequence for ``seed``: ``images``, ``label`` and
    the Galaxy10 float columns."""
    _check_args(n, seed, start, size)
    cdf = _label_cdf(class_weights)
    images = np.empty((n, size, size, 3), np.uint8)
    out = {name: np.empty(n, np.float64) for name in OPTIONAL_FLOAT_FIELDS}
    labels = np.empty(n, np.uint8)
    sin_lo, sin_hi = math.sin(math.radians(-25.0)), math.sin(math.radians(35.0))  # DECaLS-like footprint
    pxscale = PXSCALE * REF_SIZE / size  # the cutout always spans 256 DECals pixels of sky
    for k in range(n):
        rng = _row_rng(seed, start + k)
        label = _row_label(rng, cdf)
        labels[k] = label
        out["ra"][k] = rng.uniform(0.0, 360.0)
        out["dec"][k] = math.degrees(math.asin(rng.uniform(sin_lo, sin_hi)))
        out["redshift"][k] = 0.004 + rng.gamma(2.2, 0.03)
        out["pxscale"][k] = pxscale
        images[k] = render_galaxy(label, rng, size)
    return {"images": images, "label": labels, **out}


def write_synthetic_h5(
    path: str | os.PathLike,
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    chunk: int = 256,
    class_weights: Sequence[float] | None = None,
    progress: bool = True,
) -> Path:
    """Write ``n`` synthetic images with the Galaxy10 DECals HDF5 schema, atomically.

    Generated and written ``chunk`` rows at a time so memory stays bounded; the file appears
    at ``path`` only once complete (written to ``path + ".tmp"`` then ``os.replace``).
    """
    from pipeline.progress import tqdm

    if n <= 0 or chunk <= 0:
        raise ValueError(f"n and chunk must be > 0, got n={n}, chunk={chunk}")
    _check_args(n, seed, 0, size)
    _label_cdf(class_weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    columns = {"label": np.uint8, **dict.fromkeys(OPTIONAL_FLOAT_FIELDS, np.float64)}
    try:
        with H5Writer(tmp, n, (size, size, 3), np.uint8, columns, gzip=1) as f, tqdm(
            total=n, unit="img", desc=f"synthetic {path.name}", disable=not progress
        ) as bar:
            f.attrs["generator"] = "astroflow pipeline.data.sources.synthetic"
            f.attrs["seed"] = seed
            for lo in range(0, n, chunk):
                m = min(chunk, n - lo)
                batch = generate_arrays(m, size=size, seed=seed, start=lo, class_weights=class_weights)
                f.write(lo, batch["images"], batch)
                bar.update(m)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def preview_grid(path_png: str | os.PathLike, n_per_class: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Save a class-by-example PNG grid, for eyeballing that each class looks like its morphology."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(NUM_CLASSES, n_per_class, figsize=(1.6 * n_per_class + 2.2, 1.6 * NUM_CLASSES), squeeze=False)
    for label in range(NUM_CLASSES):
        for j in range(n_per_class):
            ax = axes[label, j]
            ax.imshow(render_galaxy(label, np.random.default_rng([seed, label, j]), size))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[label, 0].set_ylabel(f"{label} {CLASS_NAMES[label]}", rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path_png)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

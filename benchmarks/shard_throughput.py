"""prepare + validate + shard throughput against the raw sequential h5py read rate of the same file.

    python benchmarks/shard_throughput.py [--n 5000] [--size 256] [--format png] [--out benchmarks/results/...md]

The input is a generated Galaxy10-schema file (gzip level 1, one chunk per image, like the real
file which is compressed). Its images are synthetic galaxies (a few hundred rendered, then shifted
and re-noised so every row is distinct) so that PNG sees realistic, not random, pixels.
Target (issue 2): the chain at no worse than 1/4 of the raw read rate with PNG.
"""

from __future__ import annotations

from pipeline.runtime import cpu_name
import argparse
import platform
import resource
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import load_config
from pipeline.data.prepare import DATASET_FILE, prepare
from pipeline.data.shards import shard
from pipeline.data.sources.synthetic import generate_arrays
from pipeline.data.validate import validate


def make_input(path: Path, n: int, size: int, seed: int = 0) -> None:
    base = generate_arrays(min(n, 200), size=size, seed=seed)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        images = h5.create_dataset("images", (n, size, size, 3), np.uint8, chunks=(1, size, size, 3), compression="gzip", compression_opts=1)
        h5["ans"] = base["label"][np.arange(n) % len(base["label"])]
        h5["ra"] = rng.uniform(0, 360, n)
        h5["dec"] = rng.uniform(-90, 90, n)
        h5["redshift"] = rng.uniform(0, 0.3, n)
        h5["pxscale"] = np.full(n, 0.262)
        for lo in range(0, n, 256):
            k = min(256, n - lo)
            idx = np.arange(lo, lo + k) % len(base["label"])
            chunk = base["images"][idx].astype(np.int16)
            chunk = np.roll(chunk, rng.integers(-3, 4), axis=1) + rng.integers(-2, 3, chunk.shape, dtype=np.int16)
            images[lo : lo + k] = np.clip(chunk, 0, 255).astype(np.uint8)


def raw_read_rate(path: Path, chunk: int = 256) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "r") as h5:
        n = h5["images"].shape[0]
        for lo in range(0, n, chunk):
            h5["images"][lo : lo + chunk]
    return n / (time.perf_counter() - t0)


def peak_rss_mb() -> tuple[float, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024, child_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--format", default="png", choices=["png", "jpg", "npy"])
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as markdown here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "input.h5"
        t0 = time.perf_counter()
        make_input(src, args.n, args.size)
        print(f"generated {args.n} x {args.size}px input ({src.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s")
        raw_read_rate(src)  # warm the page cache so both measurements read from memory
        raw = raw_read_rate(src)
        cfg = load_config(None, ["data.source=h5", f"data.path={src}", f"shard.image_format={args.format}", f"validate.image_shape=[{args.size},{args.size},3]"])
        times = {}
        t = time.perf_counter()
        prepare(cfg, root / "prepared", progress=False)
        times["prepare"] = time.perf_counter() - t
        t = time.perf_counter()
        validate(cfg, root / "prepared" / DATASET_FILE, root / "validation", progress=False)
        times["validate"] = time.perf_counter() - t
        t = time.perf_counter()
        manifest = shard(cfg, root / "prepared" / DATASET_FILE, root / "shards", validation_report=root / "validation" / "report.json", progress=False)
        times["shard"] = time.perf_counter() - t
        total = sum(times.values())
        chain = args.n / total
        shard_mb = sum(s["bytes"] for sp in manifest["splits"].values() for s in sp["shards"]) / 1e6
    self_mb, child_mb = peak_rss_mb()
    ratio = chain / raw
    lines = [
        f"# shard throughput ({args.format}), {datetime.now(timezone.utc):%Y-%m-%d}",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {cpu_name()}, {__import__('os').cpu_count()} cores",
        f"- input: {args.n} images {args.size}x{args.size}x3 uint8, gzip-1 HDF5; shards {shard_mb:.0f} MB",
        "",
        "| measure | images/s |",
        "|---|---|",
        f"| raw sequential h5py read | {raw:,.0f} |",
        *[f"| {k} alone | {args.n / v:,.0f} |" for k, v in times.items()],
        f"| prepare+validate+shard | {chain:,.0f} |",
        "",
        f"**ratio chain / raw read: {ratio:.3f}** (target >= 0.25: {'met' if ratio >= 0.25 else 'NOT met'})",
        "",
        f"peak RSS: main process {self_mb:.0f} MB (the stages run in it; encoding uses threads), largest child process {child_mb:.0f} MB",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

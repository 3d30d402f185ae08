"""How the catalog's costs grow with its input, from 10 k to 1 M cutouts, and with Dask worker processes.

Inputs: Galaxy10-schema HDF5 files of ``--sizes`` cutouts at ``--size`` px (a pool of 4,096 synthetic galaxies
tiled, rolled by a row-dependent offset: content does not change the cost) and folders of ``--folder-sizes`` PNG
files. Model: a random-weights ``--model`` (default ``astroformer_pico``) at ``--size`` px.

Each measurement runs in its own process (``--phase``), so its peak RSS is its own:

* ``predict``: ``astroflow predict``'s function on a fresh catalog: end-to-end rate (process start to exit,
  start-up included), steady rate (rows after the first chunk over the time between the first and the last
  chunk commit, from the completion records), start-up (process start to first commit), planning time
  (``plan_run``: run record, index of the input, completion records), peak RSS;
* ``noop``: the same call again, which has nothing to do (process wall and the call alone);
* ``nightly``: ``run_nightly`` with the input in an inbox (scan, plan, one call per chunk, finalise), then a
  re-run with nothing to do;
* ``read``: ``pandas.read_parquet`` of the whole ``predictions`` dataset;
* ``dask``: ``predict`` with ``--dask local:K`` (K worker processes; cluster start included end to end).

Usage: ``python benchmarks/catalog_scale.py [--sizes 10000 100000 1000000] [--folder-sizes 10000 100000]
[--dask-size 20000] [--workdir /tmp/astroflow-scale]``; prints markdown tables (``--json FILE`` keeps the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
POOL = 4096


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ------------------------------------------------------------------ inputs


def _pool(size: int, cache: Path) -> np.ndarray:
    from pipeline.data.sources.synthetic import write_synthetic_h5
    import h5py

    path = cache / f"pool-{size}.h5"
    if not path.is_file():
        write_synthetic_h5(path, POOL, size=size, seed=0, progress=False)
    with h5py.File(path, "r") as f:
        return f["images"][:]


def make_h5(path: Path, n: int, size: int, pool: np.ndarray) -> Path:
    """``n`` cutouts, uncompressed, 64 rows per HDF5 chunk, with ra/dec."""
    import h5py

    if path.is_file():
        return path
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(n)
    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (n, size, size, 3), np.uint8, chunks=(64, size, size, 3))
        for lo in range(0, n, 65536):
            hi = min(n, lo + 65536)
            rows = np.arange(lo, hi)
            block = pool[rows % POOL]
            images[lo:hi] = np.roll(block, shift=int(lo // 65536) % size, axis=2)
        f["ans"] = (np.arange(n) % 10).astype(np.uint8)
        f["ra"] = rng.uniform(0, 360, n)
        f["dec"] = rng.uniform(-90, 90, n)
    tmp.replace(path)
    return path


def make_folder(path: Path, n: int, pool: np.ndarray) -> Path:
    """``n`` PNG files in sub-folders of 1,000."""
    from PIL import Image

    if (path / ".done").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    for i in range(n):
        sub = path / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        Image.fromarray(pool[i % POOL]).save(sub / f"g{i:07d}.png", compress_level=1)
    (path / ".done").write_text("")
    return path


def make_checkpoint(path: Path, model: str, size: int) -> Path:
    import torch

    from models.factory import create_model
    from pipeline.config import GALAXY10_CLASS_NAMES, Config
    from pipeline.learn.checkpoint import save_checkpoint

    if not path.is_file():
        torch.manual_seed(0)
        net = create_model(model, num_classes=len(GALAXY10_CLASS_NAMES), img_size=size)
        cfg = Config()
        cfg.model.name, cfg.model.img_size = model, size
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"model": net.state_dict(), "config": cfg.to_dict(), "class_names": list(GALAXY10_CLASS_NAMES),
                               "model_name": model, "img_size": size, "epoch": 0, "metrics": {}})
    return path


# ------------------------------------------------------------------ phases (each in its own process)


def _config(args: argparse.Namespace) -> Any:
    from pipeline.config import load_config

    return load_config(None, [f"predict.batch_size={args.batch_size}", f"predict.chunk_size={args.chunk_size}",
                              "predict.workers=0", "predict.device=cpu", f"predict.threads={args.threads}",
                              "schedule.inbox_settle_s=0"])


def _commit_times(catalog: Path) -> list[tuple[float, int]]:
    import datetime as dt

    out = []
    for p in catalog.glob("runs/*/chunks/*.json"):
        rec = json.loads(p.read_text())
        out.append((dt.datetime.fromisoformat(rec["committed_at"]).timestamp(), int(rec["num_items"])))
    return sorted(out)


def _rates(catalog: Path, started: float) -> dict[str, Any]:
    commits = _commit_times(catalog)
    if len(commits) < 2:
        return {"steady_img_s": None, "startup_s": None}
    span = commits[-1][0] - commits[0][0]
    return {"steady_img_s": round(sum(n for _, n in commits[1:]) / span, 1) if span > 0 else None,
            "startup_s": round(commits[0][0] - started, 2)}


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process; ``args.started``: when the parent started it (epoch seconds)."""
    from pipeline.catalog import predict as predict_mod
    from pipeline.catalog.distributed import predict_on_dask

    cfg = _config(args)
    src, catalog, ckpt = Path(args.input), Path(args.catalog), Path(args.checkpoint)
    out: dict[str, Any] = {}
    if args.phase == "read":
        import pandas as pd

        t = time.perf_counter()
        out["rows"] = len(pd.read_parquet(catalog / "predictions"))
        out["read_s"] = round(time.perf_counter() - t, 2)
    elif args.phase in ("predict", "noop"):
        if args.phase == "predict":
            t = time.perf_counter()
            predict_mod.plan_run(cfg, ckpt, src, catalog)
            out["plan_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        summary = predict_mod.predict(cfg, ckpt, src, catalog, progress=False)
        out.update(call_s=round(time.perf_counter() - t, 2), rows=summary["num_predicted"], status=summary["status"])
    elif args.phase == "dask":
        summary = predict_on_dask(f"local:{args.dask_workers}", cfg, ckpt, src, catalog, progress=False)
        out.update(rows=summary["num_predicted"], status=summary["status"])
    elif args.phase in ("nightly", "nightly-noop"):
        out.update(_nightly(cfg, src, catalog, ckpt))
    out["peak_rss_mb"] = peak_rss_mb()
    out.update(_rates(catalog, args.started) if args.phase in ("predict", "dask", "nightly") else {})
    return out


def _nightly(cfg: Any, src: Path, catalog: Path, ckpt: Path) -> dict[str, Any]:
    from pipeline.catalog import nightly

    inbox = catalog.parent / f"{catalog.name}-inbox"
    inbox.mkdir(exist_ok=True)
    link = inbox / src.name
    if not link.exists():
        link.symlink_to(src)
    job = nightly.Job(cfg, ckpt, None, catalog)
    t = time.perf_counter()
    nightly.scan_inbox(inbox, nightly.load_state(catalog)["inputs"], 0)
    scan = time.perf_counter() - t
    t = time.perf_counter()
    with nightly.catalog_lock(catalog, 60):
        summary = nightly.classify_new(job, inbox, nightly.run_inline)
    return {"scan_s": round(scan, 3), "call_s": round(time.perf_counter() - t, 2), "rows": summary["rows_written"],
            "failed": len(summary["failed"])}


def run_phase(args: argparse.Namespace, name: str, src: Path, catalog: Path, ckpt: Path, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", name, "--input", str(src), "--catalog", str(catalog), "--checkpoint", str(ckpt),
           "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
           "--dask-workers", str(extra.get("workers", 1)), "--started", repr(time.time())]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} on {src} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 2)
    if out.get("rows") and name in ("predict", "dask", "nightly"):
        out["e2e_img_s"] = round(out["rows"] / wall, 1)
    return out


def catalog_files(catalog: Path) -> dict[str, Any]:
    files = [p for p in catalog.rglob("*") if p.is_file()]
    parquet = [p for p in files if p.suffix == ".parquet"]
    return {"files": len(files), "parquet_files": len(parquet), "bytes": sum(p.stat().st_size for p in files)}


def measure(args: argparse.Namespace, kind: str, src: Path, n: int, ckpt: Path) -> dict[str, Any]:
    catalog = Path(args.workdir) / "catalogs" / f"{kind}-{n}"
    shutil.rmtree(catalog, ignore_errors=True)
    shutil.rmtree(catalog.parent / f"{catalog.name}-inbox", ignore_errors=True)
    row: dict[str, Any] = {"input": kind, "n": n}
    mode = "nightly" if kind.startswith("nightly") else "predict"
    full = run_phase(args, mode, src, catalog, ckpt)
    noop = run_phase(args, "nightly-noop" if mode == "nightly" else "noop", src, catalog, ckpt)
    read = run_phase(args, "read", src, catalog, ckpt)
    row.update(full=full, noop=noop, read=read, catalog=catalog_files(catalog))
    print(f"{kind} {n}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| input | n | e2e img/s | steady img/s | start-up s | peak RSS MB | plan s | run s | no-op s (call) "
            "| no-op % | catalog files (parquet) | catalog MB | read-back s |")
    lines = [head, "|---|" + "---:|" * 12]
    for r in rows:
        f, o, c = r["full"], r["noop"], r["catalog"]
        lines.append(
            f"| {r['input']} | {r['n']:,} | {f.get('e2e_img_s')} | {f.get('steady_img_s')} | {f.get('startup_s')} | {f['peak_rss_mb']} "
            f"| {f.get('plan_s', f.get('scan_s'))} | {f['wall_s']} | {o['wall_s']} ({o['call_s']}) | {100 * o['wall_s'] / f['wall_s']:.1f} "
            f"| {c['files']} ({c['parquet_files']}) | {c['bytes'] / 1e6:.1f} | {r['read']['read_s']} |"
        )
    return "\n".join(lines)


def dask_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Dask worker processes | n | e2e img/s (cluster start included) | steady img/s | start-up s |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['n']:,} | {r['e2e_img_s']} | {r['steady_img_s']} | {r['startup_s']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--folder-sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--nightly-sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--dask-size", type=int, default=20_000, help="0: skip the Dask phases")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--model", default="astroformer_pico")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/astroflow-scale")
    p.add_argument("--json", default=None)
    for name in ("--phase", "--input", "--catalog", "--checkpoint"):  # one measurement in this process (run_phase)
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dask-workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pool = _pool(args.size, work)
    ckpt = make_checkpoint(work / f"{args.model}-{args.size}.pt", args.model, args.size)
    load = os.getloadavg()
    results: dict[str, Any] = {"load_before": load, "rows": [], "dask": []}
    for n in sorted({*args.sizes, *args.nightly_sizes, args.dask_size} - {0}):
        make_h5(work / f"h5-{n}.h5", n, args.size, pool)
    for n in args.sizes:
        results["rows"].append(measure(args, "h5", work / f"h5-{n}.h5", n, ckpt))
    for n in args.nightly_sizes:
        results["rows"].append(measure(args, "nightly h5", work / f"h5-{n}.h5", n, ckpt))
    for n in args.folder_sizes:
        results["rows"].append(measure(args, "folder", make_folder(work / f"png-{n}", n, pool), n, ckpt))
    if args.dask_size:
        src = work / f"h5-{args.dask_size}.h5"
        for k in (1, 2):
            catalog = work / "catalogs" / f"dask{k}"
            shutil.rmtree(catalog, ignore_errors=True)
            r = run_phase(args, "dask", src, catalog, ckpt, workers=k)
            results["dask"].append({"workers": k, "n": args.dask_size, **r})
            print(f"dask {k}: {json.dumps(r)}", file=sys.stderr, flush=True)
    results["load_after"] = os.getloadavg()
    print(table(results["rows"]))
    print()
    print(dask_table(results["dask"]))
    print(f"\n1-min load average before/after: {load[0]:.2f} / {results['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Throughput of the predict stage against a plain per-image loop and against the model alone.

Input: ``--num`` synthetic Galaxy10-like cutouts (``pipeline.data.sources.synthetic``) at ``--size`` px, written
both as a Galaxy10-schema HDF5 file and as a folder of JPEG files (the same images). Model: a
randomly initialised ``--model`` at the checkpoint's ``--img-size`` (weights do not change the cost).

Measured, each in its own process so that peak RSS (``resource.getrusage``) belongs to that phase alone:

* ``loop``   : for each file, PIL open, ``eval_transform``, the PyTorch model on one image (the naive script,
  with ``--loop-threads`` torch threads, default torch's own choice);
* ``model``  : predict's own scoring (``score_stream``: same backend, threads, streams and batch size as predict)
  on preprocessed tensors already in memory: the ceiling predict can reach;
* ``folder`` : ``predict`` on the JPEG folder (fresh catalog), and ``h5``: ``predict`` on the HDF5 file.

Usage: ``python benchmarks/predict_throughput.py [--num 5000] [--workers 2] [--threads 0] ...``;
prints a markdown table (and ``--json`` writes the raw figures).
"""

from __future__ import annotations

from pipeline.runtime import cpu_name
import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its (waited-for) children, e.g. DataLoader workers."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def build_inputs(args: argparse.Namespace) -> dict[str, str]:
    """The HDF5 file, the JPEG folder and the checkpoint, generated once per settings and reused."""
    import h5py
    import torch
    from PIL import Image

    from models.factory import create_model
    from pipeline.learn.checkpoint import save_checkpoint
    from pipeline.config import GALAXY10_CLASS_NAMES, Config
    from pipeline.data.sources.synthetic import write_synthetic_h5

    work = Path(args.workdir) / f"n{args.num}-s{args.size}"
    h5 = work / "galaxy10.h5"
    folder = work / "jpeg"
    if not h5.is_file():
        write_synthetic_h5(h5, args.num, size=args.size, seed=0, progress=False)
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        with h5py.File(h5, "r") as f:
            for lo in range(0, args.num, 500):
                for i, img in enumerate(f["images"][lo : lo + 500], start=lo):
                    sub = folder / f"{i // 1000:03d}"
                    sub.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img).save(sub / f"gal{i:06d}.jpg", quality=95)
        (folder / "done").write_text("")
    ckpt = work / f"{args.model}-{args.img_size}.pt"
    onnx_path = ckpt.with_suffix(".onnx")
    if not ckpt.is_file():
        torch.manual_seed(0)
        net = create_model(args.model, num_classes=len(GALAXY10_CLASS_NAMES), img_size=args.img_size)
        cfg = Config()
        cfg.model.name, cfg.model.img_size = args.model, args.img_size
        save_checkpoint(
            ckpt,
            {"model": net.state_dict(), "config": cfg.to_dict(), "class_names": list(GALAXY10_CLASS_NAMES),
             "model_name": args.model, "img_size": args.img_size, "epoch": 0, "metrics": {}},
        )
    if args.backend == "onnx" and not onnx_path.is_file():
        from pipeline.score.export import export_onnx

        export_onnx(ckpt, onnx_path)  # where predict looks first, so its timing holds no export
    return {"h5": str(h5), "folder": str(folder), "checkpoint": str(ckpt), "onnx": str(onnx_path), "work": str(work)}


def _set_threads(threads: int) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def phase_loop(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any]:
    """The naive script: one file at a time through PIL, the transform and the model."""
    import torch
    from PIL import Image

    from pipeline.learn.checkpoint import load_model
    from pipeline.data.transforms import eval_transform

    threads = _set_threads(args.loop_threads)
    model, cfg, payload = load_model(paths["checkpoint"])
    tf = eval_transform(int(payload["img_size"]), cfg.train.input_range)
    files = sorted(Path(paths["folder"]).rglob("*.jpg"))[: args.loop_limit]
    labels = []
    with torch.inference_mode():
        model(tf(np.asarray(Image.open(files[0]).convert("RGB")))[None])  # warm-up
        start = time.perf_counter()
        for f in files:
            with Image.open(f) as im:
                x = tf(np.asarray(im.convert("RGB")))
            labels.append(int(model(x[None]).softmax(1).argmax()))
        elapsed = time.perf_counter() - start
    return {"images": len(files), "seconds": elapsed, "images_per_s": len(files) / elapsed, "threads": threads}


def phase_model(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any]:
    """The ceiling: predict's own scoring (same backend, threads, streams, batch size) on preprocessed
    tensors already in memory, with no decoding, no input reading and no Parquet writing."""
    import h5py
    import torch

    from pipeline.catalog.classify import _Decoded, inference_streams, score_stream
    from pipeline.runtime import compute_threads
    from pipeline.data.transforms import eval_batch_transform
    from pipeline.score.trained_model import OnnxBackend, TorchBackend, TrainedModel

    model = TrainedModel.load(paths["checkpoint"])
    threads = compute_threads(args.threads, args.workers)
    device = torch.device("cpu")
    streams = inference_streams(args.streams, threads, device)
    per_stream = max(1, threads // streams)
    tf = eval_batch_transform(model.img_size, model.input_range)
    with h5py.File(paths["h5"], "r") as f:
        images = f["images"][:]
    batches = [
        _Decoded(0, b, [], tf(list(images[lo : lo + args.batch_size])))
        for b, lo in enumerate(range(0, len(images), args.batch_size))
    ]
    if args.backend == "onnx":
        backend: Any = OnnxBackend(Path(paths["onnx"]), device, per_stream)
        torch.set_num_threads(1)  # as predict does: torch only glues, and its idle OpenMP threads would spin
    else:
        backend = TorchBackend(model.network, device)
        torch.set_num_threads(per_stream)
    run = lambda bs: sum(len(p) for _, p in score_stream(backend, bs, streams, tta=False, temperature=1.0, num_classes=len(model.class_names)))  # noqa: E731
    run(batches[:2])  # warm-up
    start = time.perf_counter()
    n = run(batches)
    elapsed = time.perf_counter() - start
    return {"images": n, "seconds": elapsed, "images_per_s": n / elapsed, "threads": threads, "streams": streams}


def phase_predict(args: argparse.Namespace, paths: dict[str, str], which: str) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.catalog.predict import predict

    out = Path(paths["work"]) / f"catalog-{which}-{os.getpid()}"
    cfg = load_config(
        None,
        [
            "predict.device=cpu",
            f"predict.workers={args.workers}",
            f"predict.threads={args.threads}",
            f"predict.streams={args.streams}",
            f"predict.batch_size={args.batch_size}",
            f"predict.chunk_size={args.chunk_size}",
            f"predict.backend={args.backend}",
        ],
    )
    start = time.perf_counter()
    summary = predict(cfg, Path(paths["checkpoint"]), Path(paths[which]), out, progress=False)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    n = summary["num_written"] + summary["num_errors_new"]
    return {"images": n, "seconds": elapsed, "images_per_s": n / elapsed, "errors": summary["num_errors"], "threads": summary["threads"], "streams": summary["streams"]}


def run_phase(args: argparse.Namespace, phase: str) -> dict[str, Any]:
    """One phase in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64, help="side of the generated cutouts")
    parser.add_argument("--model", default="astroformer_pico")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="inference threads of predict and model-alone; 0 = library default")
    parser.add_argument("--streams", type=int, default=0, help="batches scored at once (predict.streams); 0 = predict's default")
    parser.add_argument("--loop-threads", type=int, default=0, help="torch threads of the per-image loop; 0 = torch's default")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--loop-limit", type=int, default=1000, help="images timed in the per-image loop (a rate)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all phases, interleaved; best of each kept")
    parser.add_argument("--workdir", default="/tmp/astroflow-bench")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    paths = build_inputs(args)

    if args.phase:
        fn = {"loop": phase_loop, "model": phase_model}.get(args.phase)
        result = fn(args, paths) if fn else phase_predict(args, paths, args.phase)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    phases = ["model", "folder", "h5", "loop"]
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in phases}
    for _ in range(args.repeats):
        for p in phases:
            rounds[p].append(run_phase(args, p))
    best = {p: max(rs, key=lambda r: r["images_per_s"]) for p, rs in rounds.items()}
    model_rate, loop_rate = best["model"]["images_per_s"], best["loop"]["images_per_s"]
    settings = {k: getattr(args, k) for k in ("num", "size", "model", "img_size", "batch_size", "chunk_size", "workers", "threads", "streams", "loop_threads", "backend", "loop_limit", "repeats")}
    report = {
        "settings": settings,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "best": best,
        "rounds": rounds,
    }
    print(f"settings: {json.dumps(settings)}")
    print(f"machine: {report['machine']}  date: {report['date']}\n")
    print("| phase | images | img/s | vs loop | vs model alone | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in ["loop", "model", "folder", "h5"]:
        r = best[p]
        print(
            f"| {p} | {r['images']} | {r['images_per_s']:.1f} | {r['images_per_s'] / loop_rate:.1f}x | "
            f"{100 * r['images_per_s'] / model_rate:.0f}% | {r['peak_rss_mb']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

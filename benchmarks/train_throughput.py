"""Training throughput: the model fed by the shard loader vs the same model fed from tensors already in memory.

The ratio is the loader's cost: 1.0 means decoding and augmenting never make the model wait. On a GPU the
script also times AMP (bf16 and fp16 autocast) against float32 on in-memory batches; a setting that runs out
of memory is reported as such and the others still run. The model gets every core (``--threads`` to change);
``train_stage.py`` measures the stage itself, whose thread policy decides on its own.

    python benchmarks/train_throughput.py                      # params.yaml's model/train on fresh synthetic shards
    python benchmarks/train_throughput.py --shards data/shards --steps 30 --set train.workers=4

Uses the stage's own pieces (loader, augmentation, model factory, optimizer, mixup, loss), so it measures
what ``astroflow train`` runs, minus validation and checkpointing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from pipeline.learn import recipe
from pipeline.data.transforms import normalize_batch
from pipeline.learn.augment import train_transform
from pipeline.config import Config, load_config
from pipeline.data.prepare import write_prepared
from pipeline.data.reader import StreamSpec, make_loader
from pipeline.runtime import available_cores, cpu_name
from pipeline.data.shards import load_manifest, shard_urls, write_shards
from pipeline.data.sources.arrays import ArraySource
from pipeline.data.sources.synthetic import generate_arrays

ROOT = Path(__file__).resolve().parents[1]


def make_shards(cfg: Config, out: Path, num_images: int, size: int) -> Path:
    """Synthetic 256 px galaxies, prepared and sharded exactly as the pipeline does."""
    d = generate_arrays(num_images, size=size, seed=0)
    write_prepared(ArraySource(d["images"], d["label"]), out / "prepared.h5", cfg.data, progress=False)
    write_shards(cfg, out / "prepared.h5", out / "shards", progress=False)
    return out / "shards"


def timed_steps(cfg: Config, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                warmup: int, steps: int, amp: str) -> float:
    """Images per second of full training steps (normalise, mixup, forward, backward, update) after ``warmup``."""
    t = cfg.train
    torch.manual_seed(0)
    model = recipe.build_train_model(cfg, num_classes=10).to(device).train()
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = recipe.build_optimizer(model, t, device)
    mixup = Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, label_smoothing=t.label_smoothing, num_classes=10) \
        if t.mixup_alpha > 0 or t.cutmix_alpha > 0 else None
    loss_fn = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    dtype = recipe.amp_dtype(amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    seen, start = 0, 0.0
    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        if i == warmup + steps:
            break
        x = normalize_batch(images.to(device, non_blocking=True), t.input_range).contiguous(memory_format=fmt)
        y = labels.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def loader_batches(cfg: Config, shards: Path, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    t = cfg.train
    counts = load_manifest(shards)["splits"]["train"]["class_counts"]
    spec = StreamSpec(
        urls=tuple(shard_urls(shards, "train")), batch_size=t.batch_size, seed=t.seed, steps=steps,
        shuffle_buffer=t.shuffle_buffer, stratify=tuple(i for i, n in enumerate(counts.values()) if n) if t.stratified_batches else (),
    )
    device_is_cuda = torch.cuda.is_available()
    for images, labels, _, _ in make_loader(spec, train_transform(t, cfg.model.img_size), t.workers, device_is_cuda):
        yield images, labels


def memory_batches(cfg: Config) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One fixed uint8 batch at the model's input size, as the loader delivers it, repeated."""
    t, size = cfg.train, cfg.model.img_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (t.batch_size, size, size, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    labels = torch.randint(0, 10, (t.batch_size,), generator=g)
    while True:
        yield images, labels


def loader_only(cfg: Config, shards: Path, warmup: int, steps: int) -> float:
    seen, start = 0, 0.0
    for i, (_, labels) in enumerate(loader_batches(cfg, shards, warmup + steps)):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--shards", type=Path, default=None, help="default: generate synthetic shards in a temp dir")
    parser.add_argument("--num-images", type=int, default=800, help="synthetic images when --shards is not given")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="model threads on the CPU (default: every core)")
    args = parser.parse_args()
    cfg = load_config(args.params if args.params.is_file() else None, args.overrides)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t = cfg.train
    if device.type == "cpu":
        torch.set_num_threads(args.threads or available_cores())
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(cfg, Path(tmp), args.num_images, cfg.data.synthetic.image_size)
        print(f"# {cfg.model.name} at {cfg.model.img_size}px, batch {t.batch_size}, workers {t.workers}, "
              f"rotation {t.rotation}, randaugment {t.randaugment}, device {device} "
              f"({torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}), "
              f"torch threads {torch.get_num_threads()}")
        # alternate the two feeds so a load change on a shared machine hits both alike; report the median round
        feed, fed, mem = [], [], []
        for _ in range(args.rounds):
            feed.append(loader_only(cfg, shards, args.warmup, args.steps))
            fed.append(timed_steps(cfg, loader_batches(cfg, shards, args.warmup + args.steps), device, args.warmup, args.steps, t.amp))
            mem.append(timed_steps(cfg, memory_batches(cfg), device, args.warmup, args.steps, t.amp))
    print(f"# load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    quiet = max(range(args.rounds), key=lambda i: mem[i])  # the round least slowed by other processes
    print(f"| setting | images/s, median of {args.rounds} rounds | least-contended round | all rounds |")
    print("|---|---|---|---|")
    rows = [
        (f"shard loader alone (decode + augment, {t.workers} workers)", feed),
        ("training fed by the shard loader", fed),
        ("training fed from memory", mem),
        ("ratio loader-fed / in-memory", [a / b for a, b in zip(fed, mem)]),
    ]
    for name, values in rows:
        print(f"| {name} | {statistics.median(values):.2f} | {values[quiet]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    if device.type == "cuda":
        for amp in ("none", "bf16", "fp16"):
            try:
                speed = f"{timed_steps(cfg, memory_batches(cfg), device, args.warmup, args.steps, amp):.1f}"
            except torch.OutOfMemoryError:
                speed = "out of memory"
            torch.cuda.empty_cache()
            print(f"| GPU in-memory, amp {amp} | {speed} | | |")


if __name__ == "__main__":
    main()

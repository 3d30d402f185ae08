"""Training images/s and MFU on one device, eager and compiled, fed from memory with the stage's device path.

Each step is what the train stage runs on a GPU: a uint8 batch already on the device, the exact rotations/flips
there (``DeviceAugment``), normalisation, timm's mixup when configured, autocast, the fused optimizer where
torch has one, channels-last. Modes: ``eager``, ``blocks`` (regional ``torch.compile`` of the repeated blocks)
and ``model`` (whole-model compile). The first step's time (compilation included) is reported separately.
MFU = images/s x 3 x 2 x forward MACs per image (``models.summary.count_macs``) / the card's dense peak.
An out-of-memory error or a failed compile is reported as that row's result, and the next row runs.

    python benchmarks/gpu_train.py --models astroformer_0,astroformer_4 --img-size 256 --batch 128 \
        --out benchmarks/results/gpu_train.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.learn import recipe
from pipeline.learn.augment import DeviceAugment
from pipeline.data.transforms import normalize_batch

ROOT = Path(__file__).resolve().parents[1]
# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg_overrides: list[str], params: Path | None, mode: str, device: torch.device, warmup: int, steps: int) -> dict:
    """First-step seconds, steady images/s and forward MACs per image for one model and mode."""
    from models.summary import count_macs

    cfg = load_config(params, cfg_overrides)
    t, size = cfg.train, cfg.model.img_size
    torch.manual_seed(0)
    model = recipe.build_train_model(cfg, num_classes=10).to(device).to(memory_format=torch.channels_last).train()
    macs = count_macs(model, size)
    model.train()
    net = recipe.compile_network(model, model, mode) if mode != "eager" else model
    opt = recipe.build_optimizer(model, t, device)
    loss_fn, mixup = recipe.loss_and_mixup(t, 10)
    dtype = recipe.amp_dtype(t.amp, device)
    augment = DeviceAugment(t)
    augment.reseed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (t.batch_size, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (t.batch_size,), generator=g).to(device)
    first, start = 0.0, 0.0
    for i in range(warmup + steps + 1):
        if i == 1:
            sync(device)
            first = time.perf_counter() - start
        if i == warmup + 1:
            sync(device)
            start = time.perf_counter()
        elif i == 0:
            start = time.perf_counter()
        x = normalize_batch(augment(images), t.input_range).contiguous(memory_format=torch.channels_last)
        y = labels
        if mixup is not None:
            x, y = mixup(x, y)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    rate = steps * t.batch_size / (time.perf_counter() - start)
    return {"first_step_s": first, "images_per_s": rate, "macs": macs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "configs" / "astroformer_galaxy10.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--models", default="astroformer_0,astroformer_4")
    parser.add_argument("--modes", default="eager,blocks,model", help="eager, blocks (regional compile), model")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: by name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"## Training from memory on {name} ({datetime.date.today()}, torch {torch.__version__})",
        "",
        f"batch {args.batch}, {args.img_size} px, amp {args.amp}, channels-last, device augmentation, {args.steps} timed steps "
        f"after {args.warmup}; peak {peak / 1e12 if peak else 'unknown'} TFLOP/s",
        "",
        "| model | mode | first step s (compile) | images/s | GMACs/image | MFU |",
        "|---|---|---|---|---|---|",
    ]
    emit(lines, args.out)
    for model in args.models.split(","):
        overrides = [f"model.name={model}", f"model.img_size={args.img_size}", f"train.batch_size={args.batch}",
                     f"train.amp={args.amp}", "train.channels_last=true", *args.overrides]
        for mode in args.modes.split(","):
            try:
                r = measure(overrides, args.params if args.params.is_file() else None, mode, device, args.warmup, args.steps)
                mfu = f"{r['images_per_s'] * 6 * r['macs'] / peak:.1%}" if peak else "n/a"
                line = f"| {model} | {mode} | {r['first_step_s']:.1f} | {r['images_per_s']:.1f} | {r['macs'] / 1e9:.2f} | {mfu} |"
            except torch.OutOfMemoryError:
                line = f"| {model} | {mode} | out of memory | | | |"
            except Exception as exc:  # a compile failure is a result to report, not the end of the benchmark
                line = f"| {model} | {mode} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            emit([line], args.out)
    emit([""], args.out)


def emit(lines: list[str], out: Path | None) -> None:
    """Print, and append to ``out`` at once: a later row that runs out of time leaves the earlier ones recorded."""
    print("\n".join(lines), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

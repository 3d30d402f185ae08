"""Predict throughput with JPEG decoding on the GPU: encoded cutouts in, class probabilities out.

Synthetic 256 px galaxies are JPEG-encoded in memory; each batch of encoded bytes is decoded on the device
(``torchvision.io.decode_jpeg(device="cuda")``, nvJPEG; TorchCodec's CUDA build is not needed), resized with the
pipeline's resize, normalised and classified under bf16 autocast. Printed: decode alone, and decode + model,
in images/s. On a machine without CUDA the same runs on the CPU (a smoke test, not a figure).

    python benchmarks/gpu_predict_decode.py --model astroformer_0 --img-size 256 --batch 256 --out benchmarks/results/gpu_predict.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import decode_jpeg

from pipeline.data.sources.synthetic import generate_arrays
from pipeline.data.transforms import normalize_batch, resize


def encoded_jpegs(n: int, size: int) -> list[torch.Tensor]:
    """``n`` synthetic galaxies as JPEG bytes (uint8 tensors, what a reader hands the decoder)."""
    images = generate_arrays(min(n, 256), size=size, seed=0)["images"]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i % len(images)]).save(buf, format="JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def decode(batch: list[torch.Tensor], device: torch.device, img_size: int) -> torch.Tensor:
    """Encoded JPEGs -> one NCHW uint8 batch at ``img_size`` on ``device``."""
    decoded = decode_jpeg(batch, device=device) if device.type == "cuda" else [decode_jpeg(b) for b in batch]
    return torch.cat([resize(im[None], img_size) for im in decoded])


def timed(fn, batches: list[list[torch.Tensor]], device: torch.device) -> float:
    fn(batches[0])  # warm-up: nvJPEG handles, cuDNN plans
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for b in batches:
        fn(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="astroformer_0")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from models.factory import create_model

    device = torch.device(args.device)
    jpegs = encoded_jpegs(args.images, args.source_size)
    batches = [jpegs[i : i + args.batch] for i in range(0, len(jpegs), args.batch)]
    model = create_model(args.model, num_classes=10, img_size=args.img_size).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    @torch.inference_mode()
    def predict(batch: list[torch.Tensor]) -> torch.Tensor:
        x = normalize_batch(decode(batch, device, args.img_size), "imagenet").contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return model(x).float().softmax(1)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"## Predict with JPEG decoding on {name} ({datetime.date.today()}, torch {torch.__version__})",
        "",
        f"{args.images} JPEGs of {args.source_size} px, batch {args.batch}, {args.model} at {args.img_size} px, bf16",
        "",
        "| setting | images/s |",
        "|---|---|",
    ]
    try:
        lines.append(f"| decode_jpeg on {device.type} + resize | {timed(lambda b: decode(b, device, args.img_size), batches, device):.0f} |")
        lines.append(f"| decode + resize + normalise + {args.model} forward | {timed(predict, batches, device):.0f} |")
    except torch.OutOfMemoryError:
        lines.append("| out of memory: lower --batch | |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

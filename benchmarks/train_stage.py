"""The train stage end to end against a plain in-memory loop: stage speed, whole-run efficiency, and today's code.

Each round runs, one after the other (interleaved, so a change of machine load hits every setting alike):

* ``memory``: a plain loop over one in-memory batch with every core (``torch.set_num_threads(cores)``), the same
  model, recipe, batch and image size (``train_throughput.timed_steps``), in its own process;
* ``stage``: ``python -m pipeline.cli train`` on generated shards, validation and checkpoints every epoch as in
  the default config, timed from process start to exit;
* ``base`` (with ``--base DIR``): the same command run from another checkout, e.g. today's code in a git worktree
  (``git worktree add /tmp/af_base HEAD``), on the same shards.

Printed per setting: the stage's training rate (median of its epochs' ``images_per_s`` in history.csv), the
whole-run rate (images trained / process wall time) and their ratios to ``memory``; medians over rounds.

    python benchmarks/train_stage.py --set model.name=astroformer_0 --rounds 3
    python benchmarks/train_stage.py --base /tmp/af_base --rounds 3        # params.yaml's astroformer_pico
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def memory_rate(params: Path, overrides: list[str], warmup: int, steps: int) -> float:
    """Images/s of the plain in-memory loop, every core, in a fresh process (as the stage gets one)."""
    cmd = [sys.executable, __file__, "--memory-loop", "--params", str(params), "--warmup", str(warmup), "--steps", str(steps)]
    for o in overrides:
        cmd += ["--set", o]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return float(json.loads(out.strip().splitlines()[-1])["images_per_s"])


def stage_run(code: Path, overrides: list[str], shards: Path, out: Path) -> dict[str, float]:
    """One ``astroflow train`` process from ``code`` with its own params.yaml and ``overrides``: wall seconds
    start to exit, and its epochs' training rates."""
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "-q", "--params", str(code / "params.yaml"), "--shards", str(shards),
           "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{code}: train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(out / "history.csv") as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    threads = " / ".join(line.split("model threads:")[1].strip() for line in proc.stderr.splitlines() if "model threads:" in line)
    return {"wall_s": wall, "epoch_rate": statistics.median(rates), "threads": threads}


def memory_loop(args: argparse.Namespace) -> None:
    """The ``--memory-loop`` child: print the in-memory rate as JSON."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import memory_batches, timed_steps

    from pipeline.config import load_config
    from pipeline.runtime import available_cores

    cfg = load_config(args.params, args.overrides)
    torch.set_num_threads(available_cores())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    speed = timed_steps(cfg, memory_batches(cfg), device, args.warmup, args.steps, cfg.train.amp)
    print(json.dumps({"images_per_s": speed, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="for the in-memory loop and the data; "
                        "each stage run reads its checkout's params.yaml, with the same --set overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="in-memory loop: untimed steps")
    parser.add_argument("--steps", type=int, default=12, help="in-memory loop: timed steps")
    parser.add_argument("--base", type=Path, default=None, help="another checkout to time the same stage with")
    parser.add_argument("--memory-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_loop:
        memory_loop(args)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import make_shards

    from pipeline.config import load_config
    from pipeline.runtime import available_cores, cpu_name

    overrides = [f"train.epochs={args.epochs}", *args.overrides]
    cfg = load_config(args.params, overrides)
    t = cfg.train
    settings = ["memory", "stage"] + (["base"] if args.base else [])
    results: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(cfg, root, args.num_images, cfg.data.synthetic.image_size)
        train_images = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
        images_trained = t.epochs * (train_images // t.batch_size) * t.batch_size
        print(f"- {cfg.model.name} at {cfg.model.img_size}px, batch {t.batch_size}, workers {t.workers}, {t.epochs} epochs "
              f"of {train_images} training images ({args.num_images} generated), {cpu_name()}, {available_cores()} cores")
        for r in range(args.rounds):
            for s in settings:
                if s == "memory":
                    results[s].append({"rate": memory_rate(args.params, overrides, args.warmup, args.steps)})
                else:
                    run = stage_run(ROOT if s == "stage" else args.base, overrides, shards, root / f"{s}-{r}")
                    results[s].append({**run, "rate": images_trained / run["wall_s"]})
                print(f"- round {r + 1} {s}: {results[s][-1]}", flush=True)
    report(results, settings)


def report(results: dict[str, list[dict[str, float]]], settings: list[str]) -> None:
    mem = [m["rate"] for m in results["memory"]]
    print(f"- load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n| setting | median of {len(mem)} rounds | all rounds |")
    print("|---|---|---|")

    def row(name: str, values: list[float]) -> None:
        print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")

    row("in-memory loop, every core (images/s)", mem)
    for s in settings[1:]:
        runs = results[s]
        row(f"{s}: training rate, median epoch (images/s)", [x["epoch_rate"] for x in runs])
        row(f"{s}: training rate / in-memory", [x["epoch_rate"] / m for x, m in zip(runs, mem)])
        row(f"{s}: whole run, start to exit (s)", [x["wall_s"] for x in runs])
        row(f"{s}: whole-run efficiency (images trained / wall s / in-memory)", [x["rate"] / m for x, m in zip(runs, mem)])
        if s == "stage":
            print(f"| stage: model threads chosen | {'; '.join(str(x['threads']) for x in runs)} | |")
    if "base" in results:
        row("stage / base, training rate", [a["epoch_rate"] / b["epoch_rate"] for a, b in zip(results["stage"], results["base"])])
        row("stage / base, whole run", [b["wall_s"] / a["wall_s"] for a, b in zip(results["stage"], results["base"])])


if __name__ == "__main__":
    main()

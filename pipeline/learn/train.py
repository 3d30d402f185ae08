"""Stage ``train``: the Astroformer recipe (Dagli 2023, Table 5) on the WebDataset shards, alone or under torchrun.

Everything comes from ``cfg.model`` and ``cfg.train`` and from timm: ``create_optimizer_v2`` (Lookahead-RAdam by
default), ``create_scheduler_v2`` (cosine with warmup; ``exponential`` is timm's ``StepLRScheduler`` stepped
every update), ``Mixup`` with ``SoftTargetCrossEntropy``, RandAugment, stochastic depth and ``ModelEmaV3``.

Reproducibility. Every epoch's randomness is derived from ``(train.seed, epoch)`` when the epoch starts: the
shard order, the shuffle buffers, augmentation, mixup and dropout. An epoch is therefore a pure function of
the state at its start, which ``last.pt`` holds, so a run killed anywhere and resumed from the last finished
epoch ends with the same weights as an uninterrupted one: bit for bit on the CPU with ``deterministic: true`` on
the same machine, ``train.workers`` and world size (the data order depends on the reader slots, float sums on
the thread count).

Data. Each rank runs ``train_samples // (world_size * batch_size)`` steps per epoch (every rank the same
number, as DDP requires). The reading work is split into units: each shard, cut into ``ceil(slots / shards)``
interleaved parts when there are fewer shards than reader slots (ranks x workers), so every slot gets work and
every sample belongs to exactly one unit. Units are dealt to slots after a per-epoch shuffle; a slot cycles
through its units (re-dealt each cycle) until it has produced its share of batches, so ranks whose shards hold
fewer samples top up from the next cycle instead of stalling the others.

Class-stratified batches (``train.stratified_batches``). Each slot keeps its shuffled samples in per-class
FIFO queues. A batch takes the oldest queued sample of every class present in the training split, then fills
its remaining ``batch_size - num_classes`` places with the oldest queued samples whatever their class, so
class frequencies otherwise follow the data. Queues fill until every class has a sample or the buffer reaches
``max(shuffle_buffer, 4 * batch_size)`` samples; a class still missing then reuses one of its recently emitted
samples (a class rarer than one per batch is thus oversampled by replay rather than dropped).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import StepLRScheduler, create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from pipeline.learn.augment import normalize_batch, train_transform
from pipeline.learn.checkpoint import (
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import Config, load_config
from pipeline.learn.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_flag,
    broadcast_state,
    destroy_distributed,
    init_distributed,
    resolve_device,
)
from pipeline.errors import AstroflowError, CheckpointError, ConfigError, DataError
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.layout import StageRun
from pipeline.runtime import compute_threads
from pipeline.data.shards import decode_image, load_manifest, shard_urls
from pipeline.data.transforms import eval_transform

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_macro_f1", "lr", "images_per_s")
REPLAY_PER_CLASS = 16
VAL_MIN_BATCH = 64
LOSS_SYNC_EVERY = 10  # steps between GPU->host syncs of the running loss (progress bar only; every step on CPU)

Sample = tuple[dict[str, Any], int]

# Seed streams: one purpose per tag so no two consumers share a random sequence.
_MAIN, _WORKER, _UNITS, _BUFFER, _LOADER = range(5)


def seed_int(*parts: int) -> int:
    """A 32-bit seed that depends on every part (numpy's SeedSequence hashing, no collisions by addition)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(*parts: int) -> None:
    """Seed Python's, numpy's and torch's global generators: timm's augmentations and mixup draw from them."""
    s = seed_int(*parts)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class StreamSpec:
    """What one rank's loader reads in one epoch; ``steps=None`` means a single ordered pass (validation)."""

    urls: tuple[str, ...]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    steps: int | None = None
    shuffle_buffer: int = 0
    stratify: tuple[int, ...] = ()

    @property
    def train(self) -> bool:
        return self.steps is not None


def _units(num_shards: int, slots: int) -> list[tuple[int, int, int]]:
    """(shard, part, parts): enough units that every reader slot gets at least one."""
    parts = max(1, math.ceil(slots / num_shards))
    return [(s, p, parts) for s in range(num_shards) for p in range(parts)]


def _read_unit(url: str, part: int, parts: int) -> Iterator[Sample]:
    for i, sample in enumerate(wds.tariterators.tarfile_samples([{"url": url}])):
        if i % parts == part:
            yield sample, int(sample["cls"])


def slot_samples(spec: StreamSpec, slot: int, slots: int) -> Iterator[Sample]:
    """The raw samples of one reader slot: one ordered pass (validation) or shuffled cycles without end (training)."""
    units = _units(len(spec.urls), slots)
    for cycle in itertools.count():
        order = list(units)
        if spec.train:
            random.Random(seed_int(spec.seed, spec.epoch, _UNITS, cycle)).shuffle(order)
        produced = 0
        for shard, part, parts in order[slot::slots]:
            for item in _read_unit(spec.urls[shard], part, parts):
                produced += 1
                yield item
        if not spec.train:
            return
        if produced == 0:
            raise DataError(f"reader slot {slot} of {slots} got no training samples from {len(spec.urls)} shard(s)")


def plain_batches(samples: Iterator[Sample], batch_size: int) -> Iterator[list[Sample]]:
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def stratified_batches(
    samples: Iterator[Sample],
    batch_size: int,
    classes: Sequence[int],
    rng: random.Random,
    max_buffer: int,
) -> Iterator[list[Sample]]:
    """Batches that each hold every class in ``classes`` (see the module docstring for the exact rule)."""
    if batch_size < len(classes):
        raise ValueError(f"batch_size ({batch_size}) must be >= the {len(classes)} classes for stratified batches")
    queues: dict[int, deque[tuple[int, Sample]]] = {c: deque() for c in classes}
    replay: dict[int, deque[Sample]] = {c: deque(maxlen=REPLAY_PER_CLASS) for c in classes}
    arrival = itertools.count()
    buffered = 0
    exhausted = False
    warned: set[int] = set()
    while True:
        while not exhausted and buffered < max_buffer and (
            buffered < batch_size or any(not queues[c] for c in classes)
        ):
            item = next(samples, None)
            if item is None:
                exhausted = True
                break
            queues.setdefault(item[1], deque()).append((next(arrival), item))
            buffered += 1
        if buffered == 0:
            return
        batch: list[Sample] = []

        def take(c: int) -> None:
            nonlocal buffered
            item = queues[c].popleft()[1]
            buffered -= 1
            if c in replay:
                replay[c].append(item)
            batch.append(item)

        for c in classes:
            if queues[c]:
                take(c)
            elif replay[c]:
                batch.append(rng.choice(replay[c]))
            elif c not in warned:
                warned.add(c)
                log.warning("class %d not seen within %d buffered samples: some batches lack it", c, max_buffer)
        while len(batch) < batch_size and buffered > 0:
            take(min((q[0][0], c) for c, q in queues.items() if q)[1])
        if exhausted and len(batch) < batch_size:
            if batch:
                yield batch
            return
        rng.shuffle(batch)
        yield batch


def _collate(images: list[np.ndarray | torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor(labels, dtype=torch.int64)
    if isinstance(images[0], torch.Tensor):
        return torch.stack(images), y
    # NHWC uint8 viewed as NCHW: channels_last strides, no copy; normalised later on the device
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), y


class ShardStream(IterableDataset):
    """One rank's batches for one epoch; each DataLoader worker is one reader slot (see the module docstring)."""

    def __init__(self, spec: StreamSpec, transform: Callable[[np.ndarray], Any]) -> None:
        super().__init__()
        self.spec = spec
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = spec.rank * workers + worker, spec.world_size * workers
        samples = slot_samples(spec, slot, slots)
        if spec.train:
            seed_everything(spec.seed, spec.epoch, _WORKER, slot)
            rng = random.Random(seed_int(spec.seed, spec.epoch, _BUFFER, slot))
            if spec.shuffle_buffer > 1:
                samples = wds.filters.shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=rng)(samples)
            if spec.stratify:
                max_buffer = max(spec.shuffle_buffer, 4 * spec.batch_size)
                batches = stratified_batches(samples, spec.batch_size, spec.stratify, rng, max_buffer)
            else:
                batches = plain_batches(samples, spec.batch_size)
            assert spec.steps is not None
            count = spec.steps // workers + (worker < spec.steps % workers)
            batches = itertools.islice(batches, count)
        else:
            batches = plain_batches(samples, spec.batch_size)
        for batch in batches:
            # decode_image's array is read-only (PIL's buffer); torch warns on wrapping those, so copy
            images = [self.transform(np.array(decode_image(s))) for s, _ in batch]
            yield _collate(images, [label for _, label in batch])


def make_loader(spec: StreamSpec, transform: Callable[[np.ndarray], Any], workers: int, pin_memory: bool) -> DataLoader:
    """A fresh loader per epoch: workers are forked with that epoch's spec and seeded from it."""
    generator = torch.Generator().manual_seed(seed_int(spec.seed, spec.epoch, _LOADER))
    return DataLoader(
        ShardStream(spec, transform),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


# ---------------------------------------------------------------- metrics


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows = true class, columns = predicted, as int64 counts (summable across ranks exactly)."""
    idx = labels.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top1_macro_f1(cm: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy and macro F1 over the classes present as a label or a prediction (as ``pipeline.score.metrics``)."""
    cm = cm.to(torch.float64)
    total = cm.sum()
    if total == 0:
        return float("nan"), float("nan")
    tp = cm.diagonal()
    denom = cm.sum(0) + cm.sum(1)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    present = denom > 0
    return float(tp.sum() / total), float(f1[present].mean())


# ---------------------------------------------------------------- recipe


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None (with a warning) where this device cannot run it."""
    if amp == "none":
        return None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    try:
        if not torch.amp.is_autocast_available(device.type):
            raise RuntimeError(f"autocast is not available on {device.type}")
        layer = torch.nn.Linear(4, 4).to(device)
        with torch.autocast(device_type=device.type, dtype=dtype):
            out = layer(torch.ones(2, 4, device=device))
        out.float().sum().backward()
        if dtype == torch.float16:
            torch.amp.GradScaler(device.type)
    except Exception as exc:  # each backend fails its own way; all mean "not supported here"
        warnings.warn(f"train.amp={amp} is not supported on {device}: training in float32 ({exc})", stacklevel=2)
        return None
    return dtype


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, updates_per_epoch: int) -> Any:
    """timm scheduler from ``cfg.train``; 'exponential' decays by ``decay_rate`` every ``decay_steps`` updates, smoothly."""
    t = cfg.train
    if t.sched == "exponential":
        decay_steps = t.decay_steps or updates_per_epoch
        return StepLRScheduler(
            optimizer,
            decay_t=1,
            decay_rate=t.decay_rate ** (1.0 / decay_steps),
            warmup_t=t.warmup_epochs * updates_per_epoch,
            warmup_lr_init=t.warmup_lr,
            t_in_epochs=False,
        )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=t.epochs,
        decay_rate=t.decay_rate,
        min_lr=t.min_lr,
        warmup_lr=t.warmup_lr,
        warmup_epochs=t.warmup_epochs,
        step_on_epochs=not t.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_train_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The configured network; offline ``pretrained: true`` falls back to random initialisation."""
    import models  # noqa: F401  registers the Astroformer family in timm
    from models.summary import create_model

    m = cfg.model
    kwargs: dict[str, Any] = {"drop_rate": m.drop_rate} if m.drop_rate else {}
    try:
        return create_model(
            m.name, num_classes=num_classes, img_size=m.img_size, drop_path_rate=m.drop_path_rate,
            pretrained=m.pretrained, **kwargs,
        )
    except RuntimeError as exc:
        if m.pretrained is not True:
            raise
        log.warning("pretrained weights unavailable, training from scratch (%s)", str(exc)[:200])
        return create_model(m.name, num_classes=num_classes, img_size=m.img_size, drop_path_rate=m.drop_path_rate, **kwargs)


# ---------------------------------------------------------------- outputs


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def weights_digest(model: torch.nn.Module) -> str:
    """SHA256 of every parameter and buffer: identifies the trained weights, and shows ranks ended in agreement."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _summary(state: dict[str, Any], cfg: Config, params: int, world_size: int) -> dict[str, Any]:
    history = state["history"]
    best = next((h for h in history if h["epoch"] == state["best_epoch"]), None)
    speeds = [h["images_per_s"] for h in history]
    return {
        "model": cfg.model.name,
        "params": params,
        "metric": cfg.train.metric,
        "best_epoch": state["best_epoch"],
        "best": None if best is None else {k: best[k] for k in ("val_loss", "val_top1", "val_macro_f1")},
        "final": history[-1] if history else None,
        "epochs_run": len(history),
        "stopped_early": state["stopped_early"],
        "wall_time_s": round(state["wall_time_s"], 2),
        "images_per_s": round(sum(speeds) / len(speeds), 2) if speeds else None,
        "world_size": world_size,
    }


# ---------------------------------------------------------------- the stage


@dataclass
class _Run:
    """Everything one training run mutates, kept together so checkpointing cannot forget a piece."""

    cfg: Config
    info: DistInfo
    device: torch.device
    class_names: list[str]
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    autocast_dtype: torch.dtype | None
    steps: int
    train_urls: tuple[str, ...]
    val_urls: tuple[str, ...]
    stratify: tuple[int, ...]
    epoch: int = 0
    num_updates: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    wall_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def common_payload(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "class_names": list(self.class_names),
            "model_name": self.cfg.model.name,
            "img_size": self.cfg.model.img_size,
            "epoch": self.epoch,
        }

    def resume_payload(self) -> dict[str, Any]:
        return {
            **self.common_payload(),
            "kind": "train",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "num_updates": self.num_updates,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "wall_time_s": self.wall_time_s,
            "history": self.history,
            "metrics": self.history[-1] if self.history else {},
        }

    def state(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "wall_time_s": self.wall_time_s,
        }


def _restore(run: _Run, path: Path) -> None:
    """Load ``last.pt`` into the run, or raise CheckpointError saying what does not fit."""
    payload = load_checkpoint(path)
    check_compatible(
        payload, model_name=run.cfg.model.name, class_names=run.class_names, img_size=run.cfg.model.img_size, path=path
    )
    if payload.get("kind") != "train":
        raise CheckpointError(f"{path}: field 'kind' must be 'train' (a resumable checkpoint), got {payload.get('kind')!r}")
    stored = payload["config"].get("train", {}) if isinstance(payload["config"], dict) else {}
    changed = sorted(k for k, v in run.cfg.train.model_dump(mode="json").items() if stored.get(k, v) != v)
    if changed:
        log.warning("%s: train settings changed since the checkpoint (%s); the run continues with the new ones", path, ", ".join(changed))
    try:
        run.model.load_state_dict(payload["model"])
        run.optimizer.load_state_dict(payload["optimizer"])
        if run.scheduler is not None and payload.get("scheduler") is not None:
            run.scheduler.load_state_dict(payload["scheduler"])
        if run.scaler is not None and payload.get("scaler") is not None:
            run.scaler.load_state_dict(payload["scaler"])
        if run.ema is not None:
            if payload.get("ema") is None:
                raise CheckpointError(f"{path}: field 'ema' missing but train.ema is on")
            run.ema.load_state_dict(payload["ema"])
        set_rng_state(payload["rng"])
        run.epoch = int(payload["epoch"])
        run.num_updates = int(payload["num_updates"])
        run.best_metric = float(payload["best_metric"])
        run.best_epoch = int(payload["best_epoch"])
        run.bad_epochs = int(payload["bad_epochs"])
        run.stopped_early = bool(payload["stopped_early"])
        run.wall_time_s = float(payload["wall_time_s"])
        run.history = list(payload["history"])
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot resume from it: {type(exc).__name__}: {str(exc)[:300]}") from None


def _train_epoch(run: _Run, mixup: Mixup | None, loss_fn: torch.nn.Module, progress: bool) -> dict[str, float]:
    cfg, t = run.cfg, run.cfg.train
    seed_everything(t.seed, run.epoch, _MAIN, run.info.rank)
    spec = StreamSpec(
        urls=run.train_urls,
        batch_size=t.batch_size,
        rank=run.info.rank,
        world_size=run.info.world_size,
        seed=t.seed,
        epoch=run.epoch,
        steps=run.steps,
        shuffle_buffer=t.shuffle_buffer,
        stratify=run.stratify,
    )
    loader = make_loader(spec, train_transform(t, cfg.model.img_size), t.workers, run.device.type == "cuda")
    run.net.train()
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    lr_sum = 0.0
    seen = 0
    bar = tqdm(
        total=run.steps, desc=f"epoch {run.epoch + 1}/{t.epochs}", unit="step",
        disable=not (progress and run.info.is_main), dynamic_ncols=True, leave=False,
    )
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        x = normalize_batch(images.to(run.device, non_blocking=True), t.input_range).contiguous(memory_format=fmt)
        y = labels.to(run.device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with run.autocast():
            loss = loss_fn(run.net(x), y)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            if t.grad_clip:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
            run.optimizer.step()
        run.num_updates += 1
        lr_sum += run.optimizer.param_groups[0]["lr"]
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=run.num_updates)
        if run.ema is not None:
            run.ema.update(run.model, step=run.num_updates)
        loss_sum += loss.detach().to(torch.float64)
        seen += len(labels)
        bar.update(1)
        if progress and run.info.is_main and (run.device.type == "cpu" or (step + 1) % LOSS_SYNC_EVERY == 0):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(loss_sum) / (step + 1):.4f}", img_s=f"{seen * run.info.world_size / elapsed:.1f}")
    bar.close()
    if hasattr(run.optimizer, "sync_lookahead"):
        run.optimizer.sync_lookahead()
    elapsed = time.perf_counter() - start
    steps_done = max(1, run.steps)
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=run.device)]))
    broadcast_state(run.model)
    if run.ema is not None:
        broadcast_state(run.ema)
    return {
        "train_loss": float(totals[0]) / (steps_done * run.info.world_size),
        "lr": lr_sum / steps_done,
        "images_per_s": float(totals[1]) / elapsed if elapsed > 0 else float("nan"),
    }


@torch.inference_mode()
def validate(run: _Run) -> dict[str, float]:
    """One pass over the val split (split across ranks and workers); loss and confusion summed over ranks."""
    cfg = run.cfg
    net = run.ema.module if run.ema is not None else run.model
    net.eval()
    num_classes = len(run.class_names)
    # no gradients to hold, so batches of at least VAL_MIN_BATCH amortise the per-call overhead of small models
    batch = max(cfg.train.batch_size, VAL_MIN_BATCH)
    spec = StreamSpec(urls=run.val_urls, batch_size=batch, rank=run.info.rank, world_size=run.info.world_size)
    loader = make_loader(spec, eval_transform(cfg.model.img_size, cfg.train.input_range), cfg.train.workers, False)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=run.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for images, labels in loader:
        x = images.to(run.device).contiguous(memory_format=fmt)
        y = labels.to(run.device)
        with run.autocast():
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").to(torch.float64)
        cm += confusion_matrix(y, logits.argmax(dim=1), num_classes)
    all_reduce_sum(cm)
    all_reduce_sum(loss_sum)
    top1, f1 = top1_macro_f1(cm)
    n = int(cm.sum())
    return {"val_loss": float(loss_sum) / n if n else float("nan"), "val_top1": top1, "val_macro_f1": f1}


def _setup(cfg: Config, shards_dir: Path, info: DistInfo, device: torch.device) -> _Run:
    t = cfg.train
    manifest = load_manifest(shards_dir)
    class_names = list(manifest["class_names"])
    num_classes = len(class_names)
    train_info = manifest["splits"].get("train", {})
    num_train = int(train_info.get("num_samples", 0))
    if int(manifest["splits"].get("val", {}).get("num_samples", 0)) == 0:
        raise DataError(f"{shards_dir}: the val split is empty; training needs it to pick the best checkpoint")
    steps = num_train // (info.world_size * t.batch_size)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size} x {info.world_size} process(es) exceeds the {num_train} training samples"
        )
    mixing = t.mixup_alpha > 0 or t.cutmix_alpha > 0
    if mixing and t.batch_size % 2:
        raise ConfigError(f"train.batch_size must be even with mixup/cutmix (timm's Mixup), got {t.batch_size}")
    counts = train_info.get("class_counts", {})
    stratify = tuple(i for i, name in enumerate(class_names) if counts.get(name, 0) > 0) if t.stratified_batches else ()
    if stratify and t.batch_size < len(stratify):
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be >= the {len(stratify)} classes for stratified batches")

    torch.manual_seed(t.seed)
    model = build_train_model(cfg, num_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, cfg, steps)
    dtype = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema else None
    return _Run(
        cfg=cfg, info=info, device=device, class_names=class_names, model=model, net=model, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, ema=ema, autocast_dtype=dtype, steps=steps,
        train_urls=tuple(shard_urls(shards_dir, "train")), val_urls=tuple(shard_urls(shards_dir, "val")),
        stratify=stratify,
    )


def _configure_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"


def train(cfg: Config, shards_dir: Path, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.model`` on the shards; writes last.pt, best.pt, history.csv and metrics.json in ``out_dir``.

    Under torchrun every rank calls this; only rank 0 writes. Returns the metrics.json content.
    """
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        torch.set_num_threads(compute_threads(0, cfg.train.workers))
    info, created = init_distributed(device)
    try:
        return _train(cfg, shards_dir, out_dir, info, device, resume=resume, progress=progress)
    finally:
        destroy_distributed(created)


def _train(
    cfg: Config, shards_dir: Path, out_dir: Path, info: DistInfo, device: torch.device, *, resume: bool, progress: bool
) -> dict[str, Any]:
    t = cfg.train
    _configure_determinism(t.deterministic, device)
    run = _setup(cfg, shards_dir, info, device)
    params = sum(p.numel() for p in run.model.parameters())
    last = out_dir / LAST
    if resume:
        if last.is_file():
            _restore(run, last)
            if info.is_main:
                log.info("resuming from %s after epoch %d", last, run.epoch)
        elif info.is_main:
            log.warning("%s not found: training from scratch", last)
    if run.scheduler is not None:
        run.scheduler.step(run.epoch)
        run.scheduler.step_update(run.num_updates)

    if info.enabled:
        run.net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        run.net = torch.compile(run.net)

    mixup = None
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        mixup = Mixup(
            mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, label_smoothing=t.label_smoothing,
            num_classes=len(run.class_names),
        )
        loss_fn: torch.nn.Module = SoftTargetCrossEntropy()
    elif t.label_smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=t.label_smoothing)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "training %s (%.2fM params) on %s x%d: %d steps/epoch of %d, epochs %d..%d",
            cfg.model.name, params / 1e6, device, info.world_size, run.steps, t.batch_size, run.epoch + 1, t.epochs,
        )
    while run.epoch < t.epochs and not run.stopped_early:
        epoch_start = time.perf_counter()
        stats = _train_epoch(run, mixup, loss_fn, progress)
        val = validate(run)
        run.epoch += 1
        if run.scheduler is not None:
            run.scheduler.step(run.epoch, val[f"val_{t.metric}"])
        row = {
            "epoch": run.epoch,
            "train_loss": round(stats["train_loss"], 6),
            **{k: round(v, 6) for k, v in val.items()},
            "lr": stats["lr"],
            "images_per_s": round(stats["images_per_s"], 2),
        }
        run.history.append(row)
        score = val[f"val_{t.metric}"]
        improved = score > run.best_metric
        if improved:
            run.best_metric, run.best_epoch, run.bad_epochs = score, run.epoch, 0
        else:
            run.bad_epochs += 1
        stop = t.early_stopping_patience > 0 and run.bad_epochs >= t.early_stopping_patience
        run.stopped_early = broadcast_flag(stop, device)
        run.wall_time_s += time.perf_counter() - epoch_start  # train + validation; checkpoint writes excluded
        if info.is_main:
            if improved:
                weights = (run.ema.module if run.ema is not None else run.model).state_dict()
                save_checkpoint(out_dir / BEST, {**run.common_payload(), "kind": "inference", "model": weights, "metrics": row})
            save_checkpoint(last, run.resume_payload())
            _write_history(out_dir / HISTORY, run.history)
            atomic_write_json(out_dir / METRICS, _summary(run.state(), cfg, params, info.world_size))
            line = (
                f"epoch {run.epoch}/{t.epochs}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
                f"top1 {row['val_top1']:.4f} macro_f1 {row['val_macro_f1']:.4f} lr {row['lr']:.2e} "
                f"{row['images_per_s']:.1f} img/s{' (best)' if improved else ''}"
            )
            if progress:  # beside the progress bars, whether or not the caller configured logging
                tqdm.write(line)
            else:
                log.info(line)
            if run.stopped_early:
                log.info(
                    "early stopping: no %s improvement for %d epochs; best.pt holds epoch %d",
                    t.metric, run.bad_epochs, run.best_epoch,
                )
    summary = {**_summary(run.state(), cfg, params, info.world_size), "weights_sha256": weights_digest(run.model)}
    if info.is_main:
        if run.history:
            _write_history(out_dir / HISTORY, run.history)
        atomic_write_json(out_dir / METRICS, summary)
    return summary


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``train`` stage: in this process, or under torchrun when several processes are configured or the
    caller isolates training (the flows do); either way ``run.out`` ends with best.pt and metrics.json."""
    t = run.cfg.train
    if not run.isolate and t.nproc_per_node * t.nnodes == 1:
        return train(run.cfg, run.inputs["shard"], run.out, resume=run.resume, progress=run.progress)
    from pipeline.config import dump_params
    from pipeline.orchestrate.launch import TrainingFailed, stream_command, torchrun_command

    run.out.mkdir(parents=True, exist_ok=True)
    params = run.out / "params.yaml"
    dump_params(run.cfg, params)
    cmd = torchrun_command(run.cfg, params, run.inputs["shard"], run.out, run_id=run.out.name, resume=run.resume)
    stream_command(cmd, log.info, name="torchrun", cwd=run.workdir)
    if not (run.out / BEST).is_file():
        raise TrainingFailed(f"torchrun succeeded but wrote no {BEST} into {run.out}")
    return json.loads((run.out / METRICS).read_text())


def summary_line(summary: dict[str, Any]) -> str:
    best = summary.get("best") or {}
    return f"trained {summary['epochs_run']} epoch(s); best epoch {summary['best_epoch']}, val top-1 {best.get('val_top1')}"


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.learn.train`` (what torchrun launches on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.learn.train", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.params, args.overrides)
        train(cfg, args.shards, args.out, resume=args.resume, progress=not args.quiet)
    except AstroflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

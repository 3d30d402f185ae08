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
number, as DDP requires), read by the shard reader (:mod:`pipeline.data.reader`: reader slots over ranks and
workers, shuffle buffers, and with ``train.stratified_batches`` batches that hold every class present in the
training split). One loader serves all of a run's epochs (:class:`~pipeline.data.reader.EpochStream`): workers
start once and decode the next epoch during validation, and each epoch is re-seeded exactly as before.

Speed (``docs/training.md``). On the CPU the model's thread count is measured in the first steps
(:class:`~pipeline.runtime.ThreadTrial`) unless ``train.threads`` fixes it or the run is deterministic (then every
core). Validation decodes the val split once and keeps it in memory (``train.val_cache_mb``); checkpoints and
history are written by a background thread from a snapshot taken at the epoch's end, one write in flight at a
time, waited for before the next and at exit. On the device: exact rotations/flips (``train.device_augment``),
fused optimizers, and ``torch.compile`` of the model or of its repeated blocks (``train.compile_scope``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from pipeline.learn.augment import DeviceAugment, augment_on_device, train_transform
from pipeline.learn.outputs import summary, weights_digest, write_history
from pipeline.progress import tqdm
from pipeline.learn.recipe import (
    amp_dtype,
    build_optimizer,
    build_scheduler,
    build_train_model,
    class_weights,
    compile_network,
    loss_and_mixup,
)
from pipeline.learn.checkpoint import (
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import Config
from pipeline.learn.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_flag,
    broadcast_int,
    broadcast_state,
    destroy_distributed,
    dist_env,
    init_distributed,
)
from pipeline.errors import CheckpointError, ConfigError, DataError
from pipeline.io import atomic_write_json
from pipeline.layout import StageRun
from pipeline.runtime import ThreadTrial, available_cores, resolve_device, thread_candidates
from pipeline.score import metrics as M
from pipeline.data.reader import (
    DEVICE_AUG_STREAM,
    MAIN_STREAM,
    EpochStream,
    StreamSpec,
    make_loader,
    seed_everything,
    seed_int,
)
from pipeline.data.shards import load_manifest, shard_urls
from pipeline.data.transforms import normalize_batch, resize, to_nchw

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
VAL_MIN_BATCH = 64
LOSS_SYNC_EVERY = 10  # steps between GPU->host syncs of the running loss (progress bar only; every step on CPU)


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
    class_counts: tuple[int, ...]
    augment: DeviceAugment | None = None
    stream: EpochStream | None = None
    trial: ThreadTrial | None = None
    val_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    first_step_s: float | None = None
    epoch: int = 0
    num_updates: int = 0
    best_metric: float = -math.inf
    planned_epochs: int | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    wall_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_epochs(self) -> int:
        """The epochs this run trains: ``train.epochs``, or fewer planned to fit ``train.time_budget_s``."""
        return self.planned_epochs or self.cfg.train.epochs

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
            "planned_epochs": self.planned_epochs,
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
            "planned_epochs": self.planned_epochs,
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
        run.planned_epochs = payload.get("planned_epochs")
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


def _open_stream(run: _Run) -> EpochStream:
    """This rank's training batches for every epoch still to run: order and augmentation drawn from ``(train.seed, epoch)``."""
    cfg, t = run.cfg, run.cfg.train
    spec = StreamSpec(
        urls=run.train_urls, batch_size=t.batch_size, rank=run.info.rank, world_size=run.info.world_size, seed=t.seed,
        epoch=run.epoch, steps=run.steps, shuffle_buffer=t.shuffle_buffer, stratify=run.stratify,
        epochs=t.epochs - run.epoch,
    )
    transform = train_transform(t, cfg.model.img_size, geometry=run.augment is None)
    return EpochStream(spec, transform, t.workers, run.device.type == "cuda", t.train_cache_mb * 2**20)


def _epoch_batches(run: _Run) -> Iterator[Any]:
    """This epoch's batches, with the trainer's generators (and the device augmentation's) seeded for it."""
    t = run.cfg.train
    seed_everything(t.seed, run.epoch, MAIN_STREAM, run.info.rank)
    if run.augment is not None:
        run.augment.reseed(seed_int(t.seed, run.epoch, DEVICE_AUG_STREAM, run.info.rank))
    if run.stream is None:
        run.stream = _open_stream(run)
    return run.stream.next_epoch()


def _after_step(run: _Run, seconds: float) -> None:
    """Feed the thread trial; log the first step's time once (warm-up, and compilation when compiling)."""
    if run.first_step_s is None:
        run.first_step_s = seconds
        if run.info.is_main:
            log.info("first step: %.2f s%s", seconds, " (includes torch.compile)" if run.cfg.train.compile else "")
    if run.trial is not None:
        chosen = run.trial.after_step(seconds)
        if chosen is not None and run.info.is_main:
            medians = {n: round(float(np.median(v)), 3) for n, v in run.trial.times.items()}
            log.info("model threads: %d of %d cores (median step seconds by threads: %s)", chosen, available_cores(), medians)


def _step(run: _Run, loss: torch.Tensor) -> None:
    """Backward, optional clipping (after unscaling), optimizer, scheduler and EMA updates for one batch."""
    t = run.cfg.train
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
    if run.scheduler is not None:
        run.scheduler.step_update(num_updates=run.num_updates)
    if run.ema is not None:
        run.ema.update(run.model, step=run.num_updates)


def _train_epoch(run: _Run, mixup: Mixup | None, loss_fn: torch.nn.Module, progress: bool) -> dict[str, float]:
    t = run.cfg.train
    loader = _epoch_batches(run)
    run.net.train()
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    lr_sum, seen = 0.0, 0
    show = progress and run.info.is_main
    bar = tqdm(total=run.steps, desc=f"epoch {run.epoch + 1}/{run.total_epochs}", unit="step", disable=not show, dynamic_ncols=True, leave=False)
    start = tick = time.perf_counter()
    for step, (images, labels, _, _) in enumerate(loader):
        if run.trial is not None:
            run.trial.before_step()
        x = images.to(run.device, non_blocking=True)
        if run.augment is not None:
            x = run.augment(x)
        x = normalize_batch(x, t.input_range).contiguous(memory_format=fmt)
        y = labels.to(run.device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with run.autocast():
            loss = loss_fn(run.net(x), y)
        lr_sum += run.optimizer.param_groups[0]["lr"]
        _step(run, loss)
        loss_sum += loss.detach().to(torch.float64)
        seen += len(labels)
        now = time.perf_counter()
        _after_step(run, now - tick)
        tick = now
        bar.update(1)
        if show and (run.device.type == "cpu" or (step + 1) % LOSS_SYNC_EVERY == 0):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(loss_sum) / (step + 1):.4f}", img_s=f"{seen * run.info.world_size / elapsed:.1f}")
    bar.close()
    return _end_epoch(run, loss_sum, lr_sum, seen, time.perf_counter() - start)


def _end_epoch(run: _Run, loss_sum: torch.Tensor, lr_sum: float, seen: int, elapsed: float) -> dict[str, float]:
    """Sync Lookahead and the ranks' weights; the epoch's mean loss, mean lr and images/s over all ranks."""
    if hasattr(run.optimizer, "sync_lookahead"):
        run.optimizer.sync_lookahead()
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


def _resized(img_size: int, image: np.ndarray) -> torch.Tensor:
    """Evaluation's preprocessing up to normalisation: CHW uint8 at ``img_size`` (4x smaller to keep than floats)."""
    return resize(to_nchw(image), img_size)[0]


def _val_batches(run: _Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split's uint8 batches: decoded on the first pass, from memory afterwards when they fit the cache."""
    if run.val_cache is not None:
        yield from run.val_cache
        return
    cfg = run.cfg
    # no gradients to hold, so batches of at least VAL_MIN_BATCH amortise the per-call overhead of small models
    batch = max(cfg.train.batch_size, VAL_MIN_BATCH)
    spec = StreamSpec(urls=run.val_urls, batch_size=batch, rank=run.info.rank, world_size=run.info.world_size)
    loader = make_loader(spec, partial(_resized, cfg.model.img_size), cfg.train.workers, run.device.type == "cuda")
    kept, size, limit = [], 0, cfg.train.val_cache_mb * 2**20
    for images, labels, _, _ in loader:
        size += images.numel()
        if size <= limit:
            kept.append((images, labels))
        yield images, labels
    if size <= limit:
        run.val_cache = kept


@torch.inference_mode()
def validation_pass(run: _Run) -> dict[str, float]:
    """One pass over the val split (split across ranks and workers); loss and confusion summed over ranks.

    Each rank's confusion matrix comes from ``pipeline.score.metrics`` (the code ``evaluate`` reports with);
    int64 counts sum across ranks exactly, so every rank then derives the same top-1 and macro-F1. The input is
    evaluation's (resize, then :func:`normalize_batch`), normalised here on the device.
    """
    cfg = run.cfg
    net = run.ema.module if run.ema is not None else run.model
    net.eval()
    num_classes = len(run.class_names)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for images, labels in _val_batches(run):
        x = normalize_batch(images.to(run.device, non_blocking=True), cfg.train.input_range).contiguous(memory_format=fmt)
        y = labels.to(run.device, non_blocking=True)
        with run.autocast():
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").to(torch.float64)
        cm += M.confusion_matrix(labels, logits.argmax(dim=1), num_classes)
    cm = all_reduce_sum(torch.from_numpy(cm).to(run.device)).cpu().numpy()
    all_reduce_sum(loss_sum)
    n = int(cm.sum())
    return {"val_loss": float(loss_sum) / n if n else float("nan"), "val_top1": M.accuracy(cm), "val_macro_f1": M.macro_f1(cm)}


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
    optimizer = build_optimizer(model, t, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    dtype = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema else None
    return _Run(
        cfg=cfg, info=info, device=device, class_names=class_names, model=model, net=model, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, ema=ema, autocast_dtype=dtype, steps=steps,
        train_urls=tuple(shard_urls(shards_dir, "train")), val_urls=tuple(shard_urls(shards_dir, "val")),
        stratify=stratify, class_counts=tuple(int(counts.get(name, 0)) for name in class_names), augment=DeviceAugment(t) if augment_on_device(t, device) else None,
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
    device = resolve_device(cfg.train.device, "train.device", dist_env().local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads or available_cores())
    info, created = init_distributed(device)
    try:
        return _train(cfg, shards_dir, out_dir, info, device, resume=resume, progress=progress)
    finally:
        destroy_distributed(created)


def _start(cfg: Config, shards_dir: Path, last: Path, info: DistInfo, device: torch.device, resume: bool) -> _Run:
    """The run at its first epoch: built, restored from ``last`` when resuming, wrapped for DDP and compile."""
    run = _setup(cfg, shards_dir, info, device)
    if resume:
        if last.is_file():
            _restore(run, last)
            if info.is_main:
                log.info("resuming from %s after epoch %d", last, run.epoch)
        elif info.is_main:
            log.warning("%s not found: training from scratch", last)
    if run.planned_epochs is not None:
        _fit_schedule(run)
    elif run.scheduler is not None:
        run.scheduler.step(run.epoch)
        run.scheduler.step_update(run.num_updates)
    if info.enabled:
        run.net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        run.net = compile_network(run.net, run.model, cfg.train.compile_scope)
    t = cfg.train
    if device.type == "cpu" and not t.threads and not t.deterministic:
        run.trial = ThreadTrial(thread_candidates(t.workers))
    return run


def _fit_schedule(run: _Run) -> None:
    """Rebuild the schedule over ``run.total_epochs`` and bring it to the run's epoch and update count."""
    if run.scheduler is None:
        return
    run.scheduler = build_scheduler(run.optimizer, run.cfg, run.steps, epochs=run.total_epochs)
    run.scheduler.step(run.epoch)
    run.scheduler.step_update(run.num_updates)


def plan_epochs(budget_s: float, elapsed_s: float, epochs_done: int, last_epoch_s: float, cap: int) -> int:
    """Epochs that fit ``budget_s`` when the next ones take as long as the last: at least the ones done (and one),
    at most ``cap``. The last epoch, not the mean, because the first pays the warm-up."""
    more = int((budget_s - elapsed_s) // last_epoch_s) if last_epoch_s > 0 else cap
    return max(1, epochs_done, min(cap, epochs_done + max(more, 0)))


def _replan(run: _Run, epoch_s: float) -> None:
    """Under ``train.time_budget_s``: plan the epoch count after the first two epochs (all ranks agree: rank 0's
    plan is broadcast) and fit the learning-rate schedule to it; later epochs only stop early if one overran."""
    t = run.cfg.train
    if t.time_budget_s is None:
        return
    if run.epoch <= 2 or run.wall_time_s + epoch_s > t.time_budget_s:
        planned = plan_epochs(t.time_budget_s, run.wall_time_s, run.epoch, epoch_s, t.epochs)
        planned = int(broadcast_int(planned, run.device))
        if planned != run.planned_epochs:
            run.planned_epochs = planned
            _fit_schedule(run)
            if run.info.is_main:
                log.info("time budget %.0f s: %d epoch(s) planned (last epoch %.1f s)", t.time_budget_s, planned, epoch_s)


def _record_epoch(run: _Run, stats: dict[str, float], val: dict[str, float]) -> tuple[dict[str, Any], bool]:
    """Advance the epoch; append its history row; track the best epoch and early stopping (agreed by all ranks)."""
    t = run.cfg.train
    run.epoch += 1
    score = val[f"val_{t.metric}"]
    if run.scheduler is not None:
        run.scheduler.step(run.epoch, score)
    row = {
        "epoch": run.epoch,
        "train_loss": round(stats["train_loss"], 6),
        **{k: round(v, 6) for k, v in val.items()},
        "lr": stats["lr"],
        "images_per_s": round(stats["images_per_s"], 2),
    }
    run.history.append(row)
    improved = score > run.best_metric
    if improved:
        run.best_metric, run.best_epoch, run.bad_epochs = score, run.epoch, 0
    else:
        run.bad_epochs += 1
    stop = t.early_stopping_patience > 0 and run.bad_epochs >= t.early_stopping_patience
    run.stopped_early = broadcast_flag(stop, run.device)
    return row, improved


def snapshot(obj: Any) -> Any:
    """A copy of a payload that later training steps cannot change: tensors cloned to the CPU, containers copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class _Writer:
    """Rank 0's epoch files, written by one background thread so the next epoch trains meanwhile.

    One write in flight at a time, each of a :func:`snapshot`; every file is written atomically, so a kill
    leaves the previous epoch's complete files. :meth:`wait` raises the write's error, if any.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="astroflow-checkpoint")
        self.pending: Future[None] | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self.pending = self.pool.submit(write)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def _epoch_files(run: _Run, out_dir: Path, row: dict[str, Any], improved: bool, params: int) -> Callable[[], None]:
    """The writes of best.pt when improved, last.pt, history and summary, from a snapshot of this moment."""
    best = None
    if improved:
        weights = (run.ema.module if run.ema is not None else run.model).state_dict()
        best = snapshot({**run.common_payload(), "kind": "inference", "model": weights, "metrics": row})
    last, history = snapshot(run.resume_payload()), snapshot(run.history)
    metrics = summary(run.state(), run.cfg, params, run.info.world_size)

    def write() -> None:
        if best is not None:
            save_checkpoint(out_dir / BEST, best)
        save_checkpoint(out_dir / LAST, last)
        write_history(out_dir / HISTORY, history)
        atomic_write_json(out_dir / METRICS, metrics)

    return write


def _write_epoch(
    run: _Run, writer: _Writer, out_dir: Path, row: dict[str, Any], improved: bool, params: int, progress: bool
) -> None:
    """Rank 0: hand the epoch's files to the background writer, and one log line."""
    t = run.cfg.train
    writer.submit(_epoch_files(run, out_dir, row, improved, params))
    line = (
        f"epoch {run.epoch}/{run.total_epochs}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
        f"top1 {row['val_top1']:.4f} macro_f1 {row['val_macro_f1']:.4f} lr {row['lr']:.2e} "
        f"{row['images_per_s']:.1f} img/s{' (best)' if improved else ''}"
    )
    if progress:  # beside the progress bars, whether or not the caller configured logging
        tqdm.write(line)
    else:
        log.info(line)
    if run.stopped_early:
        log.info("early stopping: no %s improvement for %d epochs; best.pt holds epoch %d", t.metric, run.bad_epochs, run.best_epoch)


def _train(
    cfg: Config, shards_dir: Path, out_dir: Path, info: DistInfo, device: torch.device, *, resume: bool, progress: bool
) -> dict[str, Any]:
    t = cfg.train
    _configure_determinism(t.deterministic, device)
    run = _start(cfg, shards_dir, out_dir / LAST, info, device, resume)
    params = sum(p.numel() for p in run.model.parameters())
    weight = class_weights(t, run.class_counts)
    loss_fn, mixup = loss_and_mixup(t, len(run.class_names), None if weight is None else weight.to(device))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "training %s (%.2fM params) on %s x%d: %d steps/epoch of %d, epochs %d..%d",
            cfg.model.name, params / 1e6, device, info.world_size, run.steps, t.batch_size, run.epoch + 1, t.epochs,
        )
    writer = _Writer()
    try:
        while run.epoch < run.total_epochs and not run.stopped_early:
            epoch_start = time.perf_counter()
            stats = _train_epoch(run, mixup, loss_fn, progress)
            row, improved = _record_epoch(run, stats, validation_pass(run))
            epoch_s = time.perf_counter() - epoch_start
            run.wall_time_s += epoch_s  # train + validation; checkpoint writes excluded
            _replan(run, epoch_s)
            if info.is_main:
                _write_epoch(run, writer, out_dir, row, improved, params, progress)
    finally:
        if run.stream is not None:
            run.stream.close()
        writer.close()
    final = {**summary(run.state(), cfg, params, info.world_size), "weights_sha256": weights_digest(run.model)}
    if info.is_main:
        if run.history:
            write_history(out_dir / HISTORY, run.history)
        atomic_write_json(out_dir / METRICS, final)
    return final


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

"""The training recipe from ``cfg.model`` and ``cfg.train``, all from timm: network, scheduler, loss, mixup, autocast."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import StepLRScheduler, create_scheduler_v2

from pipeline.config import Config, TrainConfig

log = logging.getLogger(__name__)


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
    from models.factory import create_model

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


def loss_and_mixup(t: TrainConfig, num_classes: int) -> tuple[torch.nn.Module, Mixup | None]:
    """Soft-target loss with timm's Mixup when mixing, else label smoothing or plain cross-entropy."""
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        mixup = Mixup(
            mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, label_smoothing=t.label_smoothing, num_classes=num_classes
        )
        return SoftTargetCrossEntropy(), mixup
    if t.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=t.label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None

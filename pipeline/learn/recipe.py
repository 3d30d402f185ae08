"""The training recipe from ``cfg.model`` and ``cfg.train``, all from timm: network, optimizer, scheduler, loss, mixup,
autocast, and how the network is compiled."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import StepLRScheduler, create_scheduler_v2

from pipeline.config import Config, TrainConfig

log = logging.getLogger(__name__)

# timm optimizer names that build a torch optimizer with a fused CUDA kernel (``fused=True`` passes through timm)
FUSED_OPTIMIZERS = frozenset({"adam", "adamw", "sgd", "momentum"})


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


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer for ``train.opt``; on CUDA the fused kernel where the torch optimizer behind the name has one."""
    fused = {"fused": True} if device.type == "cuda" and t.opt.lower() in FUSED_OPTIMIZERS else {}
    return create_optimizer_v2(model, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay, **fused)


def compile_network(net: torch.nn.Module, model: torch.nn.Module, scope: str) -> torch.nn.Module:
    """``torch.compile`` the whole network, or (``blocks``) each block of ``model``'s repeated-block containers in place.

    Regional compilation traces one block type per shape instead of the whole graph, so compile time stays
    short for deep models; the network keeps its eager structure (and its state-dict keys) either way. Shapes
    are static: training has one batch shape, validation one or two more, and inductor's dynamic-shape path
    failed on these models' backward (torch 2.14, CPU).
    """
    if scope == "model":
        return torch.compile(net, dynamic=False)
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(dynamic=False)
    log.info("compiling %d repeated blocks regionally", len(blocks))
    return net


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The innermost repeated blocks: children of a Sequential/ModuleList whose children share one class
    (a stage's blocks), leaving out any that hold such blocks themselves (the stages around them)."""
    found = [
        child
        for module in model.modules()
        if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)) and len(module) > 1
        and len({type(c) for c in module}) == 1
        for child in module
    ]
    ids = {id(b) for b in found}
    return [b for b in found if not any(id(m) in ids for m in b.modules() if m is not b)]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, updates_per_epoch: int, epochs: int | None = None) -> Any:
    """timm scheduler from ``cfg.train`` over ``epochs`` (default ``train.epochs``; a time budget plans fewer);
    'exponential' decays by ``decay_rate`` every ``decay_steps`` updates, smoothly."""
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
        num_epochs=epochs or t.epochs,
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


def class_weights(t: TrainConfig, counts: Sequence[int]) -> torch.Tensor | None:
    """Loss weights 1/count**p (p: 1/2 for 'sqrt', 1 for 'inverse'), scaled so the average training image weighs 1:
    the loss keeps its scale, so the learning rate means the same with and without balancing."""
    if t.class_balance == "none":
        return None
    n = torch.tensor([max(int(c), 1) for c in counts], dtype=torch.float64)
    w = n ** -(0.5 if t.class_balance == "sqrt" else 1.0)
    return (w * n.sum() / (w * n).sum()).float()


class WeightedSoftTargetCrossEntropy(torch.nn.Module):
    """timm's SoftTargetCrossEntropy with per-class weights on the (mixed, smoothed) targets: timm has no weighted one."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * self.weight * F.log_softmax(x, dim=-1), dim=-1).mean()


def loss_and_mixup(
    t: TrainConfig, num_classes: int, weight: torch.Tensor | None = None
) -> tuple[torch.nn.Module, Mixup | None]:
    """Soft-target loss with timm's Mixup when mixing, else label smoothing or plain cross-entropy; class-weighted
    when ``weight`` is given (:func:`class_weights`)."""
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        mixup = Mixup(
            mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, label_smoothing=t.label_smoothing, num_classes=num_classes
        )
        return (SoftTargetCrossEntropy() if weight is None else WeightedSoftTargetCrossEntropy(weight)), mixup
    if weight is not None:
        return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=t.label_smoothing), None
    if t.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=t.label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None

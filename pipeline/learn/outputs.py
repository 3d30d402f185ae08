"""What a training run writes besides checkpoints: ``history.csv``, the summary in ``metrics.json``, a weights digest."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.io import atomic_write_text

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_macro_f1", "lr", "images_per_s")


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
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


def summary(state: dict[str, Any], cfg: Config, params: int, world_size: int) -> dict[str, Any]:
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

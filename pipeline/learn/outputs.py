"""What a training run writes besides checkpoints: ``history.csv`` and its DVCLive log, the summary, a weights digest.

The DVCLive log (``live/``: ``metrics.json`` with the latest epoch, ``plots/metrics/<name>.tsv`` per metric) is what
``dvc exp show``, ``dvc exp diff`` and ``dvc plots`` read; ``dvc.yaml`` declares it (``pipeline.orchestrate.graph``),
so DVCLive never writes a ``dvc.yaml`` nor saves experiments itself.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.io import atomic_write_text

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_macro_f1", "lr", "images_per_s")
LIVE_DIR = "live"
LIVE_METRICS = ("train_loss", "val_loss", "val_top1", "val_macro_f1", "lr")
"""The history columns DVCLive logs per epoch (its step is the epoch number)."""


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv`` and, beside it in ``live/``, the DVCLive log of the same epochs."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())
    log_live(path.parent / LIVE_DIR, history)


def _logged_epoch(live_dir: Path, history: list[dict[str, Any]]) -> int:
    """The last epoch of the DVCLive log when it agrees with ``history`` there (0: no log, or another run's)."""
    latest_file = live_dir / "metrics.json"
    latest = json.loads(latest_file.read_text()) if latest_file.is_file() else {}
    epoch = latest.get("step", 0)
    same = any(row["epoch"] == epoch and all(latest.get(k) == row[k] for k in LIVE_METRICS) for row in history)
    return epoch if same else 0


def _would_create_dvc_project() -> bool:
    """True inside a git repository without a DVC project: DVCLive would run ``dvc init`` there, and astroflow
    never creates a project behind the user's back (its log only serves ``dvc exp``/``dvc plots`` anyway)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return False
        if (folder / ".git").exists():
            return True
    return False


def log_live(live_dir: Path, history: list[dict[str, Any]]) -> None:
    """Append the epochs DVCLive has not logged yet, or start the log over when it belongs to another run
    (a resume from an older checkpoint, a forced new run), so it always holds exactly the epochs of ``history``.
    Skipped inside a git repository that is not a DVC project (see ``_would_create_dvc_project``) or has no commit."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    if _would_create_dvc_project():
        return
    logged = _logged_epoch(live_dir, history)
    rows = [row for row in history if row["epoch"] > logged]
    if not rows:
        return
    logging.getLogger("dvclive").setLevel(logging.WARNING)  # one "Logging to experiment" line per epoch otherwise
    try:
        live = Live(dir=str(live_dir), resume=logged > 0, dvcyaml=None, save_dvc_exp=False)
    except SCMError:  # a git repository without a commit yet: DVCLive cannot name its baseline, and training goes on
        return
    for row in rows:
        live.step = row["epoch"]
        for name in LIVE_METRICS:
            live.log_metric(name, row[name])
        live.next_step()


def learning_curves_png(history_csv: Path) -> bytes:
    """The learning curves of ``history.csv`` as a PNG: losses and validation accuracies on separate axes.

    A bare Agg ``Figure`` (no pyplot), so it is thread-safe and needs no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(history_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = (("cross-entropy loss", ("train_loss", "val_loss")), ("validation score", ("val_top1", "val_macro_f1")))
    for ax, (label, columns) in zip(fig.subplots(1, 2), panels):
        for column in columns:
            ax.plot(epochs, [float(r[column]) for r in rows], marker="o", markersize=3, label=column)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
        "planned_epochs": state.get("planned_epochs"),
        "stopped_early": state["stopped_early"],
        "wall_time_s": round(state["wall_time_s"], 2),
        "images_per_s": round(sum(speeds) / len(speeds), 2) if speeds else None,
        "world_size": world_size,
    }

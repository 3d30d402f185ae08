"""Stage ``evaluate``: test-split metrics, confusion matrix, predictions and a markdown report.

Preprocessing (``img_size``, ``train.input_range``) comes from the checkpoint's own config, so a model
is always evaluated on the inputs it was trained on; the current config only decides how to run
(batch size, TTA, device, workers). :func:`score_split` is shared with ``calibrate`` and the registry,
and scores through :mod:`pipeline.score.trained_model` as ``predict`` does, so the temperature is
fitted on exactly the kind of scores it is later applied to.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.score import metrics as M
from pipeline.config import Config
from pipeline.layout import StageRun
from pipeline.errors import DataError
from pipeline.runtime import resolve_device
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.data.reader import StreamSpec, make_loader
from pipeline.data.shards import load_manifest, shard_urls
from pipeline.data.transforms import eval_transform
from pipeline.score.card import build_card, write_card
from pipeline.score.trained_model import TorchBackend, TrainedModel, scores
from pipeline.progress import tqdm

CONFUSION_PNG = "confusion.png"
HEADLINE_FILE = "headline.json"
HEADLINE = ("top1", "macro_f1", "balanced_accuracy", "ece", "ece_after")
"""The few numbers ``dvc metrics show`` and ``dvc exp show`` list for a model (``metrics.json`` holds everything)."""


@dataclass
class SplitPredictions:
    """Scores of one split in row order; with TTA ``logits`` are log mean probabilities (softmax gives them back)."""

    logits: np.ndarray
    labels: np.ndarray
    ids: list[str]
    rows: np.ndarray
    images_per_second: float

    def without(self, ids: Collection[str]) -> SplitPredictions:
        """The same scores minus the galaxies in ``ids``: the registry compares models only on images neither trained on."""
        excluded = set(ids)
        keep = np.array([i not in excluded for i in self.ids], dtype=bool)
        return SplitPredictions(
            logits=self.logits[keep],
            labels=self.labels[keep],
            ids=[i for i, k in zip(self.ids, keep) if k],
            rows=self.rows[keep],
            images_per_second=self.images_per_second,
        )


def predict_split(
    model: TrainedModel,
    shards_dir: Path,
    split: str,
    *,
    batch_size: int,
    tta: bool = False,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: bool = True,
) -> SplitPredictions:
    """Batched inference over every sample of ``split`` with the model's own preprocessing; scores sorted by row."""
    shards_dir = Path(shards_dir)
    urls = shard_urls(shards_dir, split)
    expected = int(load_manifest(shards_dir)["splits"][split]["num_samples"])
    if expected == 0:
        raise DataError(f"{shards_dir}: split {split!r} has no samples")
    device = torch.device(device)
    backend = TorchBackend(model.network, device)
    transform = eval_transform(model.img_size, model.input_range)
    # no more workers than shards: worker w reads shards w, w + workers, ... whole (pipeline.data.reader)
    loader = make_loader(StreamSpec(urls=tuple(urls), batch_size=batch_size), transform, min(workers, len(urls)), device.type == "cuda")
    logits, labels, ids, rows = [], [], [], []
    views = model.tta_views(tta)
    bar = tqdm(total=expected, desc=f"evaluate {split}", unit="img", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for x, y, batch_ids, batch_rows in loader:
                logits.append(scores(backend, x, tta=views).cpu().numpy())
                labels.append(y.numpy())
                ids.extend(batch_ids)
                rows.extend(batch_rows)
                bar.update(len(y))
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if len(rows) != expected:
        raise DataError(f"{shards_dir}: split {split!r} yielded {len(rows)} samples, the manifest lists {expected}")
    order = np.argsort(np.asarray(rows), kind="stable")
    return SplitPredictions(
        logits=np.concatenate(logits)[order],
        labels=np.concatenate(labels)[order],
        ids=[ids[i] for i in order],
        rows=np.asarray(rows, dtype=np.int64)[order],
        images_per_second=len(rows) / elapsed if elapsed > 0 else float("nan"),
    )


def score_split(
    cfg: Config,
    model: TrainedModel,
    shards_dir: Path,
    split: str,
    *,
    progress: bool = True,
    exclude_ids: Collection[str] = (),
) -> SplitPredictions:
    """Check the model against the shards and score ``split`` as ``cfg.evaluate`` says.

    ``exclude_ids`` drops those galaxies from the result (the registry leaves out another model's training images).
    """
    model.check_classes(load_manifest(shards_dir)["class_names"], f"{shards_dir} (shards)")
    preds = predict_split(
        model,
        shards_dir,
        split,
        batch_size=cfg.evaluate.batch_size,
        tta=cfg.evaluate.tta,
        device=resolve_device(cfg.evaluate.device, "evaluate.device"),
        workers=cfg.evaluate.workers,
        progress=progress,
    )
    return preds.without(exclude_ids) if exclude_ids else preds


def evaluate(
    cfg: Config,
    shards_dir: Path,
    checkpoint: Path,
    out_dir: Path,
    *,
    calibration: Path | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the ``test`` split and write metrics.json, headline.json, confusion.{png,csv}, confusion_plot.csv,
    predictions.csv, report.md and the model card (model_card.{md,json}, :mod:`pipeline.score.card`).

    ``out_dir`` belongs to this stage: it is built under a temporary name and swapped in whole, so it
    either holds a complete evaluation or the previous one.
    """
    model = TrainedModel.load(checkpoint)
    temperature = model.temperature(calibration, tta=cfg.evaluate.tta) if calibration is not None else None
    preds = score_split(cfg, model, shards_dir, "test", progress=progress)
    names = model.class_names
    summary = M.summarize(preds.logits, preds.labels, names, bins=cfg.calibrate.bins)
    cm = np.asarray(summary.pop("confusion"))
    per_class = summary.pop("per_class")

    result: dict[str, Any] = {
        "split": "test",
        "model_id": model.model_id,
        "tta": cfg.evaluate.tta,
        "tta_views": model.num_views(cfg.evaluate.tta),
        **summary,
    }
    if temperature is not None:
        result.update(
            temperature=temperature,
            ece_before=summary["ece"],
            ece_after=M.expected_calibration_error(M.softmax(preds.logits, temperature), preds.labels, cfg.calibrate.bins),
            nll_before=summary["nll"],
            nll_after=M.nll(preds.logits, preds.labels, temperature),
        )
    result["per_class"] = per_class

    preds_pred = preds.logits.argmax(axis=1)
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "metrics.json", result)
        atomic_write_json(tmp / HEADLINE_FILE, {k: result[k] for k in HEADLINE if result.get(k) is not None})
        (tmp / "confusion.csv").write_text(_confusion_csv(preds.labels, preds_pred, names))
        (tmp / "confusion_plot.csv").write_text(_confusion_csv(preds.labels, preds_pred, _label_ordered(names)))
        (tmp / "predictions.csv").write_text(_predictions_csv(preds, preds_pred, temperature))
        plot_confusion(cm, names, tmp / CONFUSION_PNG, title=_plot_title(result, model))
        (tmp / "report.md").write_text(render_report(result, model, CONFUSION_PNG))
        write_card(tmp, build_card(model, shards_dir, result, preds.labels, preds.logits, bins=cfg.calibrate.bins))
    if metrics_path is not None:
        atomic_write_json(metrics_path, result)
    return result


def _confusion_csv(labels: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> str:
    """One row per sample (``actual,predicted`` class names): the input of DVC's confusion template."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["actual", "predicted"])
    w.writerows((names[a], names[p]) for a, p in zip(labels, preds))
    return buf.getvalue()


def _label_ordered(names: Sequence[str]) -> list[str]:
    """Class names prefixed with their zero-padded label: DVC's confusion template sorts classes by name."""
    width = len(str(len(names) - 1))
    return [f"{i:0{width}d} {name}" for i, name in enumerate(names)]


def _predictions_csv(preds: SplitPredictions, pred: np.ndarray, temperature: float | None) -> str:
    """Per-sample predictions; ``max_prob`` is the raw softmax, ``max_prob_calibrated`` uses the fitted temperature."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["id", "row", "label", "pred", "max_prob"]
    columns = [preds.ids, preds.rows, preds.labels, pred, M.softmax(preds.logits).max(axis=1)]
    if temperature is not None:
        header.append("max_prob_calibrated")
        columns.append(M.softmax(preds.logits, temperature).max(axis=1))
    w.writerow(header)
    for rec in zip(*columns):
        w.writerow([rec[0], int(rec[1]), int(rec[2]), int(rec[3]), *(f"{p:.6f}" for p in rec[4:])])
    return buf.getvalue()


def _plot_title(result: dict[str, Any], model: TrainedModel) -> str:
    tta = ", TTA" if result["tta"] else ""
    return (
        f"{model.model_name} @ {model.img_size}px{tta} — test, {result['num_samples']} images\n"
        f"top-1 {result['top1']:.2%}   macro-F1 {result['macro_f1']:.3f}   balanced acc. {result['balanced_accuracy']:.2%}"
    )


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path, *, title: str = "") -> None:
    """Confusion matrix PNG: colour is the row-normalised fraction (recall per true class), text the counts.

    Built on a bare Agg ``Figure`` (no pyplot), so it is thread-safe and never needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    support = cm.sum(axis=1)
    frac = np.divide(cm, support[:, None], out=np.zeros(cm.shape), where=support[:, None] > 0)
    side = max(5.0, 0.75 * n + 3.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("fraction of the true class")
    count_size = 9 if n <= 12 else max(5, 9 - (n - 12) // 3)
    for i in range(n):
        for j in range(n):
            if cm[i, j] == 0 and i != j:
                continue
            colour = "white" if frac[i, j] > 0.55 else "black"
            share = "<1%" if 0 < frac[i, j] < 0.005 else f"{frac[i, j]:.0%}"
            ax.text(j, i, f"{cm[i, j]}\n{share}", ha="center", va="center", color=colour,
                    fontsize=count_size, linespacing=1.1)
    ax.set_xticks(range(n), labels=list(class_names), rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=[f"{c} ({s})" for c, s in zip(class_names, support)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (support)")
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight", pad_inches=0.2)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.2%}" if pct else f"{value:.4f}"


def render_report(result: dict[str, Any], model: TrainedModel, confusion_png: str = CONFUSION_PNG) -> str:
    """Markdown classification report: headline metrics, per-class table with error contributions, the PNG."""
    lines = [
        "# Evaluation report",
        "",
        f"Model `{result['model_id']}` ({model.model_name}, {model.img_size} px, input range "
        f"`{model.input_range}`) on the **{result['split']}** split: {result['num_samples']} images, "
        f"test-time augmentation {'on (' + str(result.get('tta_views')) + ' views: the training symmetry)' if result['tta'] else 'off'}.",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| top-1 accuracy | {_fmt(result['top1'], True)} |",
        f"| top-5 accuracy | {_fmt(result['top5'], True)} |",
        f"| macro F1 | {_fmt(result['macro_f1'])} |",
        f"| balanced accuracy | {_fmt(result['balanced_accuracy'], True)} |",
        f"| error rate | {_fmt(result['error_rate'], True)} |",
        f"| expected calibration error | {_fmt(result['ece'])} |",
        f"| negative log-likelihood | {_fmt(result['nll'])} |",
        f"| mean softmax entropy (nats) | {_fmt(result['mean_entropy'])} |",
        "",
        "## Per class",
        "",
        "Error contribution: misclassified images of the class divided by all images; the column sums to the error rate.",
        "",
        "| class | precision | recall | F1 | support | error contribution |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, pc in result["per_class"].items():
        lines.append(
            f"| {_md(name)} | {_fmt(pc['precision'])} | {_fmt(pc['recall'])} | {_fmt(pc['f1'])} | "
            f"{pc['support']} | {_fmt(pc['error_contribution'], True)} |"
        )
    total_support = sum(pc["support"] for pc in result["per_class"].values())
    total_contrib = sum(pc["error_contribution"] for pc in result["per_class"].values())
    lines.append(
        f"| **all (macro)** | | | **{_fmt(result['macro_f1'])}** | **{total_support}** | **{_fmt(total_contrib, True)}** |"
    )
    if "temperature" in result:
        lines += [
            "",
            "## Calibration",
            "",
            f"Temperature {result['temperature']:.4f} (fitted on the validation split), measured on the test split:",
            "",
            "| | before (T = 1) | after |",
            "|---|---:|---:|",
            f"| expected calibration error | {_fmt(result['ece_before'])} | {_fmt(result['ece_after'])} |",
            f"| negative log-likelihood | {_fmt(result['nll_before'])} | {_fmt(result['nll_after'])} |",
        ]
    lines += ["", "## Confusion matrix", "", f"![confusion matrix]({confusion_png})", ""]
    return "\n".join(lines)


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``evaluate`` stage: ``train``'s best checkpoint on the test split, with ``calibrate``'s temperature."""
    from pipeline.score.calibrate import CALIBRATION_FILE
    from pipeline.learn.train import BEST

    calibration = run.inputs["calibrate"] / CALIBRATION_FILE
    return evaluate(
        run.cfg,
        run.inputs["shard"],
        run.inputs["train"] / BEST,
        run.out,
        calibration=calibration if calibration.is_file() else None,
        metrics_path=run.summary_file,
        progress=run.progress,
    )


def summary_line(summary: dict[str, Any]) -> str:
    return f"test top-1 {summary['top1']:.4f}, macro-F1 {summary['macro_f1']:.4f}"

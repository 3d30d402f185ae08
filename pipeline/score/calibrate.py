"""Stage ``calibrate``: fit a softmax temperature on the validation split.

The temperature is fitted on the same scores ``evaluate`` produces (same TTA setting), and the output
names the checkpoint's model id and that TTA setting: the calibration contract of
:class:`~pipeline.score.trained_model.TrainedModel`, which every consumer of the file applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.score import metrics as M
from pipeline.config import Config
from pipeline.io import atomic_write_json
from pipeline.layout import StageRun
from pipeline.score.trained_model import TrainedModel

SPLIT = "val"
CALIBRATION_FILE = "calibration.json"


def calibrate(cfg: Config, shards_dir: Path, checkpoint: Path, out_path: Path, *, progress: bool = True) -> dict[str, Any]:
    """Write ``out_path`` (JSON: temperature, ECE and NLL before/after on ``val``) and return it.

    Disabled calibration still scores ``val`` so the file keeps one schema and reports the raw ECE.
    """
    from pipeline.score.evaluate import score_split

    model = TrainedModel.load(checkpoint)
    result: dict[str, Any] = {
        "enabled": cfg.calibrate.enabled,
        "split": SPLIT,
        "model_id": model.model_id,
        "tta": cfg.evaluate.tta,
        "tta_views": model.num_views(cfg.evaluate.tta),
        "bins": cfg.calibrate.bins,
    }
    preds = score_split(cfg, model, shards_dir, SPLIT, progress=progress)
    if cfg.calibrate.enabled:
        t = M.fit_temperature(preds.logits, preds.labels, cfg.calibrate.max_iter)
    else:
        t = 1.0
        result["note"] = "calibrate.enabled is false: temperature fixed at 1.0 (not fitted); ECE/NLL are at T=1"
    bins = cfg.calibrate.bins
    result.update(
        temperature=t,
        num_samples=int(len(preds.labels)),
        ece_before=M.expected_calibration_error(M.softmax(preds.logits), preds.labels, bins),
        ece_after=M.expected_calibration_error(M.softmax(preds.logits, t), preds.labels, bins),
        nll_before=M.nll(preds.logits, preds.labels),
        nll_after=M.nll(preds.logits, preds.labels, t),
    )
    atomic_write_json(out_path, result)
    return result


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``calibrate`` stage: the temperature of ``train``'s best checkpoint on ``shard``'s val split."""
    from pipeline.learn.train import BEST

    return calibrate(run.cfg, run.inputs["shard"], run.inputs["train"] / BEST, run.out / CALIBRATION_FILE, progress=run.progress)


def summary_line(summary: dict[str, Any]) -> str:
    return f"calibrated: T={summary['temperature']:.3f}, val ECE {summary['ece_before']:.4f} -> {summary['ece_after']:.4f}"

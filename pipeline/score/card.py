"""The model card: what a trained model is, what it was trained and tested on, how good it is and where it fails.

``evaluate`` writes ``model_card.json`` (for programs) and ``model_card.md`` (for people) beside its metrics, and
the registry copies both next to the registered checkpoint, so a model never travels without them. Everything
comes from what evaluate already holds: the :class:`~pipeline.score.trained_model.TrainedModel` (its training
config), the shard manifest (the data hash, the split and its counts, each shard's SHA-256) and the test
scores, with 95 % bootstrap intervals from :func:`pipeline.score.bootstrap.metric_intervals`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.io import atomic_write_json, atomic_write_text, sha256_file
from pipeline.score import metrics as M
from pipeline.score.bootstrap import metric_intervals
from pipeline.score.trained_model import TrainedModel

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CARD_FILES = (CARD_MD, CARD_JSON)
CARD_VERSION = 1
LEVEL = 0.95
REPS = 1000
SEED = 0
WEAK_F1 = 0.5
"""A class below this test F1 is flagged weak."""
MIN_SUPPORT = 30
"""A class with fewer test galaxies is flagged: its F1 is too uncertain to trust either way."""

INTENDED_USE = (
    "Morphological classification of galaxy image cutouts into the classes listed here, with calibrated "
    "probabilities: sorting and pre-selecting samples for inspection, catalog triage, and population studies that "
    "propagate the stated uncertainties. Not a substitute for expert or volunteer classification of individual "
    "objects, and not for classes, surveys or image processing it was not trained on."
)
LIMITS = (
    "It was never shown images of other surveys (other instruments, depths, seeing, bands, colour mappings or pixel "
    "scales): expect it to be worse there, by an amount this card cannot state; re-evaluate on labelled data of the target survey.",
    "Inputs must be prepared as stated here (same crop, resize and input size); a different field of view changes what the model sees.",
    "Test metrics come from one test split; the intervals cover the sampling of test galaxies, not a different split, seed or survey.",
    "The probabilities are calibrated on the validation split of the same data; calibration does not transfer to other data.",
)
KNOWN_FIELDS = {
    "galaxy10": "Galaxy10 DECals cutouts: 256 px at 0.262 arcsec/px (67 arcsec across)",
    "synthetic": "synthetic DECals-like cutouts spanning 256 px at 0.262 arcsec/px (67 arcsec across)",
}
LABELS = {
    "top1": "top-1 accuracy",
    "macro_f1": "macro F1",
    "balanced_accuracy": "balanced accuracy",
    "ece": "expected calibration error",
    "ece_after": "expected calibration error, calibrated",
}
RECIPE_KEYS = ("epochs", "opt", "lr", "batch_size", "metric", "ema", "mixup_alpha", "randaugment", "label_smoothing")
SYMMETRY = {
    "none": "no rotations",
    "rot90": "the 4 exact 90-degree rotations",
    "d4": "the 8 exact rotations and flips (a flip turns a clockwise spiral into an anticlockwise one: the model cannot tell them apart)",
    "any": "rotations by any angle",
}


def build_card(
    model: TrainedModel,
    shards_dir: Path,
    result: Mapping[str, Any],
    labels: np.ndarray,
    logits: np.ndarray,
    *,
    bins: int,
) -> dict[str, Any]:
    """The card of ``model`` from evaluate's ``result`` (metrics.json) and its test scores ``logits``/``labels``."""
    manifest = load_manifest(shards_dir)
    return {
        "card_version": CARD_VERSION,
        "model": _model(model),
        "data": _data(model, manifest, Path(shards_dir)),
        "split": _split(manifest),
        "evaluation": _evaluation(result, labels, logits, len(model.class_names), bins),
        "calibration": _calibration(result),
        "intended_use": _intended_use(model, manifest),
        "weak_classes": weak_classes(result["per_class"]),
    }


def _model(model: TrainedModel) -> dict[str, Any]:
    train = model.config.train
    return {
        "model_id": model.model_id,
        "name": model.model_name,
        "parameters": int(sum(p.numel() for p in model.network.parameters())),
        "img_size": model.img_size,
        "input_range": model.input_range,
        "config_hash": model.config.hash(),
        "recipe": {k: getattr(train, k) for k in RECIPE_KEYS},
    }


def _data(model: TrainedModel, manifest: Mapping[str, Any], shards_dir: Path) -> dict[str, Any]:
    """The data's identity: the prepared content's hash (the registry's ``data_hash``) and the hash of the shard
    manifest, which lists every shard's SHA-256."""
    data = model.config.data
    return {
        "source": data.source,
        "path": data.path,
        "class_names": list(model.class_names),
        "num_images": manifest["num_images"],
        "image_shape": manifest["image_shape"],
        "data_hash": manifest["data_hash"],
        "manifest_sha256": sha256_file(shards_dir / MANIFEST),
    }


def _split(manifest: Mapping[str, Any]) -> dict[str, Any]:
    split = dict(manifest["split"])
    return {
        "seed": split.pop("seed"),
        "fractions": split,
        "stratified": True,
        "class_counts": {name: dict(s["class_counts"]) for name, s in manifest["splits"].items()},
    }


def _evaluation(
    result: Mapping[str, Any], labels: np.ndarray, logits: np.ndarray, num_classes: int, bins: int
) -> dict[str, Any]:
    """Test metrics with bootstrap intervals; the ECE is the calibrated one (``ece_after``) when there is a temperature."""
    temperature = result.get("temperature")
    probs = M.softmax(logits, temperature or 1.0)
    intervals = metric_intervals(
        labels, logits.argmax(axis=1), probs.max(axis=1), num_classes, reps=REPS, seed=SEED, level=LEVEL, bins=bins
    )
    ece_key = "ece" if temperature is None else "ece_after"
    names = {"top1": "top1", "macro_f1": "macro_f1", "balanced_accuracy": "balanced_accuracy", "ece": ece_key}
    return {
        "split": result["split"],
        "num_samples": result["num_samples"],
        "tta": result["tta"],
        "tta_views": result.get("tta_views"),
        "interval": {"level": LEVEL, "method": "percentile bootstrap over test galaxies", "reps": REPS, "seed": SEED},
        "metrics": {key: {"value": result[key], "low": intervals[name][0], "high": intervals[name][1]} for name, key in names.items()},
    }


def _calibration(result: Mapping[str, Any]) -> dict[str, Any] | None:
    if result.get("temperature") is None:
        return None
    keys = ("temperature", "ece_before", "ece_after", "nll_before", "nll_after")
    return {"fitted_on": "val", "measured_on": result["split"], **{k: result[k] for k in keys}}


def _intended_use(model: TrainedModel, manifest: Mapping[str, Any]) -> dict[str, Any]:
    data, train = model.config.data, model.config.train
    return {
        "use": INTENDED_USE,
        "limits": list(LIMITS),
        "field": KNOWN_FIELDS.get(data.source, f"{data.source} images from {data.path}, pixel scale not recorded (the source survey's)"),
        "preparation": _crop_settings(model.config.to_dict()["data"]),
        "prepared_shape": manifest["image_shape"],
        "model_input_px": model.img_size,
        "symmetry": SYMMETRY[train.rotation] + (" and random horizontal flips" if train.hflip and train.rotation != "d4" else ""),
    }


def _crop_settings(section: Mapping[str, Any], prefix: str = "data") -> dict[str, Any]:
    """Every set crop or resize key of the data config (dotted): the geometry the model's inputs must repeat."""
    found: dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            found.update(_crop_settings(value, name))
        elif value is not None and ("crop" in key or "resize" in key):
            found[name] = value
    return found


def weak_classes(per_class: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Classes flagged ``low_f1`` (test F1 under :data:`WEAK_F1`) or ``low_support`` (fewer test galaxies than
    :data:`MIN_SUPPORT`), lowest F1 first."""
    rows = []
    for name, pc in per_class.items():
        flags = [flag for flag, hit in (("low_f1", pc["f1"] < WEAK_F1), ("low_support", pc["support"] < MIN_SUPPORT)) if hit]
        if flags:
            rows.append({"class": name, **{k: pc[k] for k in ("f1", "recall", "precision", "support")}, "flags": flags})
    return sorted(rows, key=lambda r: (r["f1"], r["recall"]))


def write_card(directory: Path, card: Mapping[str, Any]) -> None:
    """``model_card.json`` and ``model_card.md`` in ``directory``, each written atomically."""
    atomic_write_json(Path(directory) / CARD_JSON, card)
    atomic_write_text(Path(directory) / CARD_MD, render_card(card))


def _num(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def render_card(card: Mapping[str, Any]) -> str:
    """The card as markdown, section by section."""
    return "\n".join([*_md_head(card), *_md_data(card), *_md_metrics(card), *_md_use(card), *_md_weak(card)]) + "\n"


def _md_head(card: Mapping[str, Any]) -> list[str]:
    m = card["model"]
    r = m["recipe"]
    return [
        f"# Model card: `{m['model_id']}`",
        "",
        f"{m['name']}, {m['parameters']:,} parameters, {m['img_size']} px inputs (`{m['input_range']}` range), "
        f"config hash `{m['config_hash']}`. "
        f"Trained for up to {r['epochs']} epochs ({r['opt']}, lr {r['lr']}, batch {r['batch_size']}, EMA {'on' if r['ema'] else 'off'}, "
        f"mixup {r['mixup_alpha']}, RandAugment {r['randaugment'] or 'off'}, label smoothing {r['label_smoothing']}); "
        f"the checkpoint is the epoch with the best validation {r['metric']} (never chosen on test).",
    ]


def _md_data(card: Mapping[str, Any]) -> list[str]:
    d, s = card["data"], card["split"]
    splits = list(s["class_counts"])
    lines = [
        "",
        "## Data and split",
        "",
        f"Source `{d['source']}`" + (f" (`{d['path']}`)" if d["path"] else "") + f": {d['num_images']} images of shape {d['image_shape']}, "
        f"data hash `{d['data_hash']}`, shard manifest SHA-256 `{d['manifest_sha256']}`.",
        "",
        f"Stratified split, seed {s['seed']}, fractions " + ", ".join(f"{k} {v}" for k, v in s["fractions"].items()) + ":",
        "",
        "| class | " + " | ".join(splits) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    for name in d["class_names"]:
        lines.append(f"| {_cell(name)} | " + " | ".join(str(s["class_counts"][sp].get(name, 0)) for sp in splits) + " |")
    return lines


def _md_metrics(card: Mapping[str, Any]) -> list[str]:
    e, c = card["evaluation"], card["calibration"]
    tta = f"on ({e['tta_views']} views)" if e["tta"] else "off"
    lines = [
        "",
        "## Test metrics",
        "",
        f"{e['num_samples']} test galaxies, test-time augmentation {tta}; "
        f"{e['interval']['level']:.0%} {e['interval']['method']} ({e['interval']['reps']} replicates).",
        "",
        f"| metric | value | {e['interval']['level']:.0%} interval |",
        "|---|---:|---:|",
        *(f"| {LABELS[k]} (`{k}`) | {_num(v['value'])} | {_num(v['low'])} - {_num(v['high'])} |" for k, v in e["metrics"].items()),
        "",
        "## Calibration",
        "",
    ]
    if c is None:
        return [*lines, "No temperature was fitted: the probabilities are the raw softmax."]
    return [
        *lines,
        f"Temperature {c['temperature']:.4f}, fitted on the {c['fitted_on']} split. On the {c['measured_on']} split: "
        f"ECE {_num(c['ece_before'])} -> {_num(c['ece_after'])}, NLL {_num(c['nll_before'])} -> {_num(c['nll_after'])}.",
    ]


def _md_use(card: Mapping[str, Any]) -> list[str]:
    u = card["intended_use"]
    prep = ", ".join(f"`{k}: {v}`" for k, v in u["preparation"].items()) or "no crop or resize"
    return [
        "",
        "## Intended use and limits",
        "",
        u["use"],
        "",
        f"Trained on {u['field']}; preparation: {prep}; prepared images {u['prepared_shape']}, resized to {u['model_input_px']} px "
        f"model inputs. Training symmetry: {u['symmetry']}.",
        "",
        *(f"- {limit}" for limit in u["limits"]),
    ]


def _md_weak(card: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## Known weak classes",
        "",
        f"Flagged: test F1 under {WEAK_F1} (`low_f1`) or fewer than {MIN_SUPPORT} test galaxies (`low_support`), lowest F1 first.",
        "",
    ]
    if not card["weak_classes"]:
        return [*lines, "None."]
    lines += ["| class | F1 | recall | precision | support | flags |", "|---|---:|---:|---:|---:|---|"]
    for w in card["weak_classes"]:
        scores = " | ".join(_num(w[k]) for k in ("f1", "recall", "precision"))
        lines.append(f"| {_cell(w['class'])} | {scores} | {w['support']} | {', '.join(w['flags'])} |")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")

"""``astroflow compare``: several candidates over repeated stratified splits at an equal budget, with intervals.

One test split of a few hundred galaxies cannot tell two models apart; repeated splits and bootstrap
intervals can, and pairing the models on the same splits removes the split-to-split spread from their
difference. Every run goes through the one pipeline: each candidate x split config runs the stored
stages (prepare ... evaluate) into the content-addressed store with ``run_in_store``, exactly like the
``train-pipeline`` flow, so prepare is built once, shards once per split, and a rerun reuses every
finished run. The epoch is picked on validation by the train stage (``best.pt`` by ``train.metric``);
only the evaluate stage's test predictions are read here. See docs/compare.md.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv

from pipeline.config import Config, apply_overrides, config_from_dict, load_config
from pipeline.errors import ConfigError, DataError, WouldOverwrite
from pipeline.io import atomic_dir, check_writable
from pipeline.layout import Layout
from pipeline.orchestrate.graph import stored_stages
from pipeline.orchestrate.runner import Outcome, run_in_store
from pipeline.orchestrate.store import plan_keys, stage_dirs
from pipeline.score import bootstrap as B
from pipeline.score.metrics import significant

log = logging.getLogger("astroflow.compare")

TABLE = "table.csv"
"""The finished table: its presence means a finished comparison, replaced only with ``--force``."""
LABELS = {"top1": "top-1", "macro_f1": "macro-F1", "balanced_accuracy": "balanced acc.", "ece": "ECE (calibrated)"}


@dataclass(frozen=True)
class Run:
    """One candidate on one split: its test predictions and what the train and evaluate stages reported."""

    candidate: str
    split: int
    split_seed: int
    keys: dict[str, str]
    predictions: B.Predictions
    train: dict[str, Any]
    values: dict[str, float]


# ------------------------------------------------------------------ configs


def _with(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with dotted-key values set; the same rule (and errors) as ``--set``."""
    return apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def candidate_configs(cfg: Config, layout: Layout, overrides: list[str]) -> dict[str, Config]:
    """Each candidate's config: its params file (with the command's --set) or the compared config, then its ``set``."""
    out = {}
    for name, cand in cfg.compare.candidates.items():
        base = cfg if cand.params is None else load_config(layout.resolve(cand.params), overrides)
        try:
            raw = _with(base.to_dict(), cand.set)
        except ConfigError as exc:
            raise ConfigError(f"compare.candidates.{name}.set: {exc}") from None
        out[name] = config_from_dict(raw, f"compare.candidates.{name}")
    return out


def budgeted(cand: Config, cfg: Config, split: int) -> Config:
    """The candidate on split ``split`` at the comparison's equal budget (the compared config's epochs or seconds)."""
    budget = {"train.epochs": cfg.train.epochs, "train.time_budget_s": cfg.compare.seconds if cfg.compare.budget == "seconds" else None}
    return config_from_dict(_with(cand.to_dict(), {**budget, "split.seed": cfg.split.seed + split}), "compare")


# ------------------------------------------------------------------ running


def run_stages(cfg: Config, layout: Layout) -> dict[str, Outcome]:
    """The stored stages of one config into the store, as the train-pipeline flow runs them: reused when keyed."""
    keys = plan_keys(cfg, layout)
    where = stage_dirs(layout.resolve(cfg.schedule.cache_root), keys)
    outcomes: dict[str, Outcome] = {}
    for spec in stored_stages():
        inputs = {up: where[up].path for up in spec.upstream}
        outcomes[spec.name] = run_in_store(where[spec.name], cfg, inputs, layout, logger=log)
    return outcomes


def read_predictions(eval_dir: Path) -> B.Predictions:
    """The evaluate stage's per-sample test predictions; the calibrated top probability when calibration ran."""
    path = eval_dir / "predictions.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; expected the evaluate stage's per-sample predictions")
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"id": "string"}))
    conf = "max_prob_calibrated" if "max_prob_calibrated" in table.column_names else "max_prob"
    return B.Predictions(
        ids=np.asarray(table["id"].to_pylist()),
        labels=table["label"].to_numpy(),
        preds=table["pred"].to_numpy(),
        confidences=table[conf].to_numpy(),
    )


def run_all(cfg: Config, layout: Layout, overrides: list[str]) -> list[Run]:
    """Every candidate x split, in split order, so the first split of every candidate finishes first."""
    candidates = candidate_configs(cfg, layout, overrides)
    runs, total = [], len(candidates) * cfg.compare.splits
    for i in range(cfg.compare.splits):
        for name, cand in candidates.items():
            run_cfg = budgeted(cand, cfg, i)
            log.info("run %d/%d: %s on split %d (split.seed %d)", len(runs) + 1, total, name, i, run_cfg.split.seed)
            outcomes = run_stages(run_cfg, layout)
            runs.append(_run(name, i, run_cfg, outcomes))
            log.info("run %d/%d: %s split %d: %s", len(runs), total, name, i, _line(runs[-1]))
    return runs


def _run(name: str, i: int, cfg: Config, outcomes: dict[str, Outcome]) -> Run:
    keys = {s: o.key for s, o in outcomes.items() if o.key is not None}
    p = read_predictions(outcomes["evaluate"].path)
    values = B.metric_values(p.labels, p.preds, p.confidences, cfg.data.num_classes, cfg.calibrate.bins)
    return Run(name, i, cfg.split.seed, keys, p, outcomes["train"].summary, values)


def _line(run: Run) -> str:
    v = run.values
    return f"test top-1 {v['top1']:.4f}, macro-F1 {v['macro_f1']:.4f}, {run.train.get('wall_time_s')} s of training"


# ------------------------------------------------------------------ statistics


def _by_candidate(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.candidate, []).append(run)
    return out


def _seconds(runs: list[Run]) -> tuple[float, float]:
    s = np.array([float(r.train.get("wall_time_s") or np.nan) for r in runs])
    return float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else 0.0


def statistics(runs: list[Run], cfg: Config) -> tuple[dict[str, dict[str, B.Summary]], dict[str, dict[str, B.Summary]]]:
    """Per candidate its metrics over splits, and per non-baseline candidate its paired difference from the baseline."""
    c = cfg.compare
    opts = {"reps": c.bootstrap, "seed": c.seed, "level": c.level, "bins": cfg.calibrate.bins}
    groups = _by_candidate(runs)
    preds = {name: [r.predictions for r in group] for name, group in groups.items()}
    k = cfg.data.num_classes
    table = {name: B.split_intervals(p, k, **opts) for name, p in preds.items()}
    base = baseline(cfg)
    paired = {}
    for name, p in preds.items():
        if name != base:
            try:
                paired[name] = B.paired_intervals(preds[base], p, k, **opts)
            except ValueError as exc:
                raise DataError(f"compare.candidates.{name} against {base}: {exc}") from None
    return table, paired


def baseline(cfg: Config) -> str:
    return cfg.compare.baseline or next(iter(cfg.compare.candidates))


# ------------------------------------------------------------------ outputs


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _g(value: float) -> float:
    return significant(value, 6)


def runs_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per candidate x split: metrics, epochs, training seconds and the store keys of its stages."""
    return [
        {
            "candidate": r.candidate,
            "split": r.split,
            "split_seed": r.split_seed,
            **{m: _g(r.values[m]) for m in B.METRICS},
            "best_epoch": r.train.get("best_epoch"),
            "epochs_run": r.train.get("epochs_run"),
            "train_seconds": r.train.get("wall_time_s"),
            **{f"key_{s}": k for s, k in r.keys.items()},
        }
        for r in runs
    ]


def table_rows(table: dict[str, dict[str, B.Summary]], runs: list[Run]) -> list[dict[str, Any]]:
    """Per candidate: mean, std and interval of each metric, and the mean and std of the training seconds."""
    groups = _by_candidate(runs)
    rows = []
    for name, summaries in table.items():
        row: dict[str, Any] = {"candidate": name, "model": groups[name][0].train.get("model"), "splits": len(groups[name])}
        for m, s in summaries.items():
            row |= {f"{m}_mean": _g(s.mean), f"{m}_std": _g(s.std), f"{m}_low": _g(s.low), f"{m}_high": _g(s.high)}
        mean, std = _seconds(groups[name])
        rows.append(row | {"train_seconds_mean": _g(mean), "train_seconds_std": _g(std)})
    return rows


def paired_rows(paired: dict[str, dict[str, B.Summary]], base: str) -> list[dict[str, Any]]:
    """Per candidate and metric: the mean over splits of (candidate - baseline), its std and paired interval."""
    return [
        {"candidate": name, "baseline": base, "metric": m, "mean_diff": _g(s.mean), "std": _g(s.std), "low": _g(s.low), "high": _g(s.high)}
        for name, summaries in paired.items()
        for m, s in summaries.items()
    ]


def _cell(s: B.Summary) -> str:
    return f"{s.mean:.3f} ± {s.std:.3f} [{s.low:.3f}, {s.high:.3f}]"


def _header(cfg: Config, command: str) -> str:
    c = cfg.compare
    budget = f"{cfg.train.epochs} epochs" if c.budget == "epochs" else f"{c.seconds:g} s of training (at most {cfg.train.epochs} epochs)"
    return (
        f"{c.splits} stratified splits (split.seed {cfg.split.seed} + i), an equal budget of {budget} per run, "
        f"the epoch picked on validation by {cfg.train.metric}; cells: mean ± std over splits "
        f"[{c.level:.0%} bootstrap interval over test galaxies, {c.bootstrap} replicates, seed {c.seed}].\n\n"
        f"Reproduce: `{command}`\n"
    )


def table_markdown(table: dict[str, dict[str, B.Summary]], runs: list[Run], cfg: Config, command: str) -> str:
    groups = _by_candidate(runs)
    lines = [
        "| candidate | model | " + " | ".join(LABELS[m] for m in B.METRICS) + " | train s |",
        "|---|---|" + "---|" * (len(B.METRICS) + 1),
    ]
    for name, summaries in table.items():
        mean, std = _seconds(groups[name])
        cells = " | ".join(_cell(summaries[m]) for m in B.METRICS)
        lines.append(f"| {name} | {groups[name][0].train.get('model')} | {cells} | {mean:.0f} ± {std:.0f} |")
    return _header(cfg, command) + "\n" + "\n".join(lines) + "\n"


def paired_markdown(paired: dict[str, dict[str, B.Summary]], cfg: Config, command: str) -> str:
    base = baseline(cfg)
    lines = ["| candidate - " + base + " | " + " | ".join(LABELS[m] for m in B.METRICS) + " |", "|---|" + "---|" * len(B.METRICS)]
    for name, summaries in paired.items():
        lines.append(f"| {name} | " + " | ".join(f"{s.mean:+.3f} [{s.low:+.3f}, {s.high:+.3f}]" for s in summaries.values()) + " |")
    note = f"Paired differences (same splits, the same resampled test galaxies for both models): mean [{cfg.compare.level:.0%} interval].\n\n"
    return note + _header(cfg, command) + "\n" + "\n".join(lines) + "\n"


def headline(table: dict[str, dict[str, B.Summary]], paired: dict[str, dict[str, B.Summary]], base: str) -> dict[str, Any]:
    """A few numbers for ``dvc metrics show``: each candidate's mean metrics and each difference from the baseline."""
    def diff(t: dict[str, B.Summary]) -> dict[str, float]:
        return {f"{m}_{k}": _g(v) for m, s in t.items() for k, v in (("diff", s.mean), ("low", s.low), ("high", s.high))}

    return {
        "baseline": base,
        "candidates": {n: {m: _g(s.mean) for m, s in t.items()} for n, t in table.items()},
        "paired": {n: diff(t) for n, t in paired.items()},
    }


def plot(table: dict[str, dict[str, B.Summary]], runs: list[Run], path: Path) -> None:
    """One panel per metric: each split's value as a point, the mean with its bootstrap interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    groups = _by_candidate(runs)
    fig, axes = plt.subplots(1, len(B.METRICS), figsize=(3.2 * len(B.METRICS), 3.2), constrained_layout=True)
    for ax, m in zip(axes, B.METRICS):
        for x, name in enumerate(names):
            ax.scatter([x] * len(groups[name]), [r.values[m] for r in groups[name]], s=14, color="0.6", zorder=2)
            s = table[name][m]
            ax.errorbar([x + 0.15], [s.mean], yerr=[[s.mean - s.low], [s.high - s.mean]], fmt="o", color="C0", capsize=4, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(LABELS[m])
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the command


def refuse_overwrite(out: Path, force: bool) -> None:
    """A finished table is replaced only with ``force``; checked before any run starts."""
    check_writable(out)
    if (out / TABLE).exists() and not force:
        raise WouldOverwrite(f"{out}: holds a finished comparison ({TABLE}); pass --force to replace it")


def compare(cfg: Config, layout: Layout, *, overrides: list[str] | None = None, force: bool = False, command: str = "") -> dict[str, Any]:
    """Run every candidate on every split (reusing the store), then write the tables, plot and compare.json."""
    out = layout.resolve(cfg.compare.out)
    refuse_overwrite(out, force)
    runs = run_all(cfg, layout, overrides or [])
    table, paired = statistics(runs, cfg)
    base = baseline(cfg)
    markdown = table_markdown(table, runs, cfg, command)
    summary = headline(table, paired, base)
    with atomic_dir(out) as tmp:
        (tmp / "runs.csv").write_text(_csv(runs_rows(runs)))
        (tmp / TABLE).write_text(_csv(table_rows(table, runs)))
        (tmp / "table.md").write_text(markdown)
        if paired:
            (tmp / "paired.csv").write_text(_csv(paired_rows(paired, base)))
            (tmp / "paired.md").write_text(paired_markdown(paired, cfg, command))
        (tmp / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(table, runs, tmp / "compare.png")
    return {"out": str(out), "markdown": markdown, "paired_markdown": paired_markdown(paired, cfg, command) if paired else "", **summary}

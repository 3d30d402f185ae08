"""The stage graph, declared once: the CLI's stage commands, ``dvc.yaml`` and the retrain flow come from it.

For each stage: the function that runs it (``<module>.run_stage``, taking a :class:`~pipeline.layout.StageRun`),
the config keys it reads, the upstream stages it reads from (and which of their files), its DVC outputs,
metrics and plots. The code a stage runs is not typed here: it is the import closure of its module
(``pipeline.orchestrate.imports``). Adding a stage is one entry here and its directory in ``pipeline.layout``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.layout import STAGE_DIRS


@dataclass(frozen=True)
class Out:
    """A DVC output, relative to the stage's directory ("" = the directory itself), or ``/``-rooted for workspace paths."""

    path: str = ""
    cache: bool = True
    persist: bool = False


@dataclass(frozen=True)
class Plot:
    """A top-level DVC plot: ``y`` is (file relative to the stage's directory, column) pairs drawn against column ``x``.

    One plot per quantity, so curves on different scales (a loss, an accuracy) never share an axis.
    """

    title: str
    x: str
    y: tuple[tuple[str, str], ...]
    y_label: str
    x_label: str = "epoch"
    template: str = "linear"


LIVE_METRICS = "live/plots/metrics"
"""Where DVCLive writes one ``<name>.tsv`` per metric (``pipeline.learn.outputs.LIVE_DIR``); its ``step`` is the epoch."""


def _live(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{LIVE_METRICS}/{name}.tsv", name) for name in names)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    module: str
    params: tuple[str, ...]
    """Config sections or dotted keys the stage reads itself (what it reads through its inputs is upstream)."""
    upstream: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Upstream stage -> the files of its directory this stage reads (() = the whole directory)."""
    outs: tuple[Out, ...] = (Out(),)
    metrics: tuple[str, ...] = ()
    """Headline metrics files (``dvc metrics show``, ``dvc exp show``): a few numbers each; relative to the stage directory."""
    plots: tuple[Plot, ...] = ()
    summary_file: str | None = None
    """Workspace file (outside the stage directory) the stage writes its whole summary to (an output, not a metric)."""
    cmd_args: str = ""
    stored: bool = True
    """Kept in the content-addressed store and run by the retrain flow (``predict`` appends to a catalog instead)."""
    resumable: bool = False

    @property
    def dir(self) -> str:
        return STAGE_DIRS[self.name]

    @property
    def function(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(self.module).run_stage  # type: ignore[no-any-return]


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare", "read the configured source into data/prepared/dataset.h5", "pipeline.data.prepare", params=("data",)
    ),
    Stage(
        "validate",
        "check the prepared data with great-expectations",
        "pipeline.data.validate",
        params=("validate", "data.class_names"),
        upstream={"prepare": ()},
        outs=(Out("summary.md", cache=False), Out("report.json", cache=False)),
    ),
    Stage(
        "shard",
        "stratified split and WebDataset shards in data/shards",
        "pipeline.data.shards",
        params=("split", "shard"),
        upstream={"prepare": (), "validate": ("report.json",)},
    ),
    Stage(
        "train",
        "train the configured model on the shards",
        "pipeline.learn.train",
        params=("model", "train"),
        upstream={"shard": ()},
        outs=(Out("best.pt"), Out("last.pt"), Out("history.csv", cache=False), Out("metrics.json", cache=False), Out("live/plots")),
        metrics=("live/metrics.json",),
        plots=(
            Plot("Loss", "step", _live("train_loss", "val_loss"), "cross-entropy loss"),
            Plot("Validation accuracy", "step", _live("val_top1", "val_macro_f1"), "top-1 / macro-F1"),
            Plot("Learning rate", "step", _live("lr"), "learning rate"),
        ),
        cmd_args="--force",  # DVC owns and versions these outputs: replacing them is its decision
        resumable=True,
    ),
    Stage(
        "calibrate",
        "fit a softmax temperature on the validation split",
        "pipeline.score.calibrate",
        params=("calibrate", "evaluate.tta", "evaluate.batch_size"),
        upstream={"shard": (), "train": ("best.pt",)},
    ),
    Stage(
        "evaluate",
        "test-split metrics, confusion matrix, report and model card",
        "pipeline.score.evaluate",
        params=("evaluate", "calibrate.bins"),
        upstream={"shard": (), "train": ("best.pt",), "calibrate": ()},
        outs=(
            *(Out(f) for f in ("metrics.json", "report.md", "confusion.png", "confusion.csv", "confusion_plot.csv", "predictions.csv")),
            *(Out(f) for f in ("model_card.md", "model_card.json")),
            Out("/metrics/eval.json", cache=False),
        ),
        metrics=("headline.json",),
        plots=(
            Plot(
                "Test-split confusion matrix",
                "predicted",
                (("confusion_plot.csv", "actual"),),
                "true class",
                x_label="predicted class",
                template="confusion",
            ),
        ),
        summary_file="metrics/eval.json",
    ),
    Stage(
        "predict",
        "classify the test split (or predict.input) into the DVC-tracked catalog data/catalog",
        "pipeline.catalog.predict",
        params=("predict", "data"),  # data.folder.pixels: how image-file inputs are read
        upstream={"shard": (), "train": ("best.pt",), "calibrate": ()},
        outs=(Out(cache=False, persist=True), Out("/metrics/predict.json", cache=False)),
        summary_file="metrics/predict.json",
        cmd_args="-q",
        stored=False,
    ),
)

GRAPH: dict[str, Stage] = {s.name: s for s in STAGES}


def stored_stages() -> tuple[Stage, ...]:
    """The stages the store keys and the retrain flow runs, in dependency order."""
    return tuple(s for s in STAGES if s.stored)


def downstream(name: str) -> list[str]:
    """``name`` and every stage that reads from it, directly or not, in graph order."""
    hit = {name}
    for stage in STAGES:
        if hit & set(stage.upstream):
            hit.add(stage.name)
    return [s.name for s in STAGES if s.name in hit]


def mermaid() -> str:
    """The graph as a Mermaid flowchart (``docs/orchestration.md`` embeds it; a test keeps it current)."""
    lines = ["flowchart LR"]
    for stage in STAGES:
        label = f"{stage.name}<br/><small>{stage.dir}</small>"
        lines.append(f'  {stage.name}["{label}"]' if stage.stored else f'  {stage.name}[/"{label}"/]')
        lines += [f"  {up} --> {stage.name}" for up in stage.upstream]
    lines += ["  evaluate -.-> registry[(registry)]", "  registry -.-> nightly[/\"nightly<br/><small>schedule.catalog</small>\"/]"]
    return "\n".join(lines)

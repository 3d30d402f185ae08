"""What the generated dvc.yaml declares as metrics and plots (the real `dvc repro` is in test_dvc.py, slow)."""

from __future__ import annotations

import yaml

from pipeline.orchestrate.dvcfile import render

DOC = yaml.safe_load(render())
PLOTS = {title: spec for plot in DOC["plots"] for title, spec in plot.items()}


def test_only_headline_files_are_metrics() -> None:
    metrics = [m if isinstance(m, str) else next(iter(m)) for s in DOC["stages"].values() for m in s.get("metrics", [])]
    assert metrics == ["data/train/live/metrics.json", "data/eval/headline.json"]


def test_every_plot_has_x_and_y_and_loss_and_accuracy_are_apart() -> None:
    assert all(spec.get("x") and spec.get("y") for spec in PLOTS.values()), PLOTS
    columns = {title: set(spec["y"].values()) for title, spec in PLOTS.items()}
    assert columns["Loss"] == {"train_loss", "val_loss"} and columns["Validation accuracy"] == {"val_top1", "val_macro_f1"}


def test_confusion_plot_has_predicted_across_and_true_down_like_the_png() -> None:
    spec = PLOTS["Test-split confusion matrix"]
    assert spec["template"] == "confusion" and spec["x"] == "predicted"
    assert spec["y"] == {"data/eval/confusion_plot.csv": "actual"}

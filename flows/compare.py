"""Flow ``compare``: ``astroflow compare`` as a Prefect flow, its tables published as artifacts.

Thin by design: one call to ``pipeline.score.compare.compare`` (the same function as the CLI), whose runs go
through the store like the ``train-pipeline`` flow's stages, so runs either built are reused by the other.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import config_from_parameters
from pipeline.config import CompareConfig, TrainConfig
from pipeline.layout import Layout
from pipeline.score import compare as cmp

FLOW_NAME = "compare"


def _table(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def publish(result: dict[str, Any]) -> list[str]:
    """The table as a table artifact, and both markdown tables (with the command to reproduce them) as a report."""
    out = Path(result["out"])
    create_table_artifact(key="compare-table", table=_table(out / cmp.TABLE), description="candidates over splits: mean, std, 95 % interval")
    report = "# astroflow compare\n\n" + result["markdown"] + ("\n" + result["paired_markdown"] if result["paired_markdown"] else "")
    create_markdown_artifact(key="compare-report", markdown=report, description=f"tables in {out}")
    return ["compare-table", "compare-report"]


@flow(name=FLOW_NAME, description="candidates over repeated stratified splits at an equal budget, with bootstrap intervals")
def compare_flow(
    compare: CompareConfig = CompareConfig(),
    train: TrainConfig = TrainConfig(),
    base_params: str | None = None,
    workdir: str = ".",
    force: bool = False,
) -> dict[str, Any]:
    """Run every candidate on every split (finished runs reused from the store) and publish the tables.

    Args:
        compare: The ``compare`` section: candidates, splits, budget, bootstrap.
        train: The training recipe every candidate starts from (train.epochs is the equal epoch budget).
        base_params: The params file the sections apply to, relative to workdir; none: the built-in defaults.
        workdir: Where relative paths resolve and compare.out is written.
        force: Replace a finished table in compare.out.
    """
    layout = Layout(Path(workdir).resolve())
    cfg = config_from_parameters(base_params, layout.root, {"compare": compare, "train": train})
    result = cmp.compare(cfg, layout, force=force, command=f"Prefect flow {FLOW_NAME} (base_params={base_params}, workdir={workdir})")
    get_run_logger().info("wrote %s", result["out"])
    return {**result, "artifacts": publish(result)}

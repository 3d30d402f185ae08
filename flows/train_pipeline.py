"""Flow ``train-pipeline``: the stored stages of the graph, then register and maybe promote the model.

Thin by design: each stage is one Prefect task around ``pipeline.orchestrate.runner.run_in_store``
(the same stage function as ``astroflow <stage>`` and ``dvc repro``), keyed by the store's key, which
covers the stage's config, code and upstream keys. A stage that ``dvc repro`` or the CLI already ran
with the same key is adopted from the workspace by hard links, so nothing is recomputed or copied.
Registration and promotion are ``pipeline.score.registry``'s, the same rule as ``astroflow registry promote``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows import config_from_parameters
from pipeline.score import registry as reg
from pipeline.config import (
    CalibrateConfig,
    Config,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    RegistryConfig,
    ShardConfig,
    SplitConfig,
    TrainConfig,
    ValidateConfig,
)
from pipeline.errors import ValidationFailed
from pipeline.score.card import CARD_MD
from pipeline.score.evaluate import CONFUSION_PNG
from pipeline.layout import Layout
from pipeline.orchestrate.graph import stored_stages
from pipeline.orchestrate.runner import run_in_store
from pipeline.orchestrate.store import StageDir, plan_keys
from pipeline.learn.outputs import learning_curves_png
from pipeline.learn.train import BEST, HISTORY
from pipeline.score.metrics import significant

FLOW_NAME = "train-pipeline"
SECTIONS = ("model", "train", "evaluate", "calibrate", "registry", "data", "validate", "split", "shard")
"""params.yaml sections that are parameters of this flow, in the form's order (what people edit first; the data
sections, with their class names, last); the rest come from ``base_params``."""


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect's key is the store directory's key (plus its token); None while the directory is incomplete."""
    return parameters["where"].prefect_key()


@task(cache_key_fn=_stage_cache_key)
def stage_task(cfg: Config, where: StageDir, inputs: dict[str, str], workdir: str) -> dict[str, Any]:
    """One stage of the graph into the store: reused, adopted from the workspace, or built."""
    try:
        outcome = run_in_store(where, cfg, {k: Path(v) for k, v in inputs.items()}, Layout(Path(workdir)), logger=get_run_logger())
    except ValidationFailed as exc:
        if exc.summary_markdown:
            create_markdown_artifact(key="validation-report", markdown=exc.summary_markdown, description="failed validation")
        raise
    return {"stage": where.stage, "key": where.key, "path": str(where.path), "how": outcome.how, "summary": outcome.summary}


@task(name="register", cache_policy=NO_CACHE)
def register_task(cfg: Config, layout_root: str, results: dict[str, dict[str, Any]], flow_run_id: str | None) -> dict[str, Any]:
    """Register the trained model with its lineage; promote it by the registry's one rule."""
    root = Layout(Path(layout_root)).resolve(cfg.registry.root)
    shards = Path(results["shard"]["path"])
    mid = reg.register_model(
        root,
        cfg,
        checkpoint=Path(results["train"]["path"]) / BEST,
        calibration=Path(results["calibrate"]["path"]) / "calibration.json",
        eval_dir=Path(results["evaluate"]["path"]),
        shards_dir=shards,
        source="flow",
        stage_keys={stage: r["key"] for stage, r in results.items()},
        flow_run_id=flow_run_id,
    )
    decision = reg.promote(root, mid, cfg, shards_dir=shards, by=f"flow run {flow_run_id}")
    get_run_logger().info("model %s: %s (%s)", mid, "promoted to production" if decision.promote else "not promoted", decision.reason)
    return {"model_id": mid, "decision": decision.to_dict(), "production_id": reg.production_id(root), "registry": str(root)}


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to 4 significant digits: 0.572, not 0.5720000000000001."""
    return {k: significant(v) if isinstance(v, float) else v for k, v in values.items()}


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_task(results: dict[str, dict[str, Any]], registered: dict[str, Any]) -> list[str]:
    """Metrics table, per-class table, report with the confusion matrix, registry decision: shown per run in the UI."""
    metrics = results["evaluate"]["summary"]
    eval_dir = Path(results["evaluate"]["path"])
    mid = registered["model_id"]
    keys = []
    headline = ("top1", "top5", "macro_f1", "balanced_accuracy", "error_rate", "ece", "nll", "ece_after", "nll_after", "temperature")
    create_table_artifact(
        key="retrain-metrics",
        table=[{"metric": k, "value": significant(metrics[k])} for k in headline if metrics.get(k) is not None],
        description=f"Test-split metrics of model {mid}",
    )
    keys.append("retrain-metrics")
    per_class = [{"class": name, **_rounded(values)} for name, values in metrics.get("per_class", {}).items()]
    create_table_artifact(key="retrain-per-class", table=per_class, description=f"Per-class test metrics of model {mid}")
    keys.append("retrain-per-class")
    confusion = eval_dir / CONFUSION_PNG
    report = (eval_dir / "report.md").read_text()
    if confusion.is_file():
        uri = _png_data_uri(confusion.read_bytes())
        report = report.replace(f"]({CONFUSION_PNG})", f"]({uri})")
        create_image_artifact(image_url=uri, key="retrain-confusion-matrix", description=f"Test-split confusion matrix of model {mid}")
        keys.append("retrain-confusion-matrix")
    create_markdown_artifact(key="retrain-report", markdown=report, description=f"Evaluation report of model {mid}")
    keys.append("retrain-report")
    card = eval_dir / CARD_MD
    if card.is_file():
        create_markdown_artifact(key="model-card", markdown=card.read_text(), description=f"Model card of model {mid}")
        keys.append("model-card")
    history = Path(results["train"]["path"]) / HISTORY
    if history.is_file():
        create_image_artifact(
            image_url=_png_data_uri(learning_curves_png(history)),
            key="retrain-learning-curves",
            description=f"Learning curves of model {mid}: loss, and validation top-1 and macro-F1, per epoch",
        )
        keys.append("retrain-learning-curves")
    d = registered["decision"]
    stages = "\n".join(f"| {s} | `{r['key']}` | `{r['path']}` |" for s, r in results.items())
    create_markdown_artifact(
        key="model-registry",
        markdown=(
            f"# Model registry\n\nCandidate `{mid}`: **{'promoted' if d['promote'] else 'not promoted'}** "
            f"({d['reason']}).\n\nProduction model: `{registered['production_id']}` in `{registered['registry']}`.\n\n"
            f"| stage | key | artifacts |\n|---|---|---|\n{stages}\n"
        ),
        description="promotion decision and stage cache keys",
    )
    keys.append("model-registry")
    return keys


# ------------------------------------------------------------------ the flow


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


@flow(name=FLOW_NAME, description="the graph's stored stages (prepare ... evaluate), then register and maybe promote")
def train_pipeline(
    model: ModelConfig = ModelConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: EvaluateConfig = EvaluateConfig(),
    calibrate: CalibrateConfig = CalibrateConfig(),
    registry: RegistryConfig = RegistryConfig(),
    data: DataConfig = DataConfig(),
    validate: ValidateConfig = ValidateConfig(),
    split: SplitConfig = SplitConfig(),
    shard: ShardConfig = ShardConfig(),
    base_params: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """Train, evaluate and maybe promote a model; stages whose key exists are reused, from the store or the workspace.

    Each section parameter overrides only the fields it sets on top of ``base_params`` (a params.yaml,
    relative to ``workdir``); ``workdir`` is where relative paths in the config resolve. Every parameter
    is optional: a field left out keeps the params file's value.

    Args:
        model: The network and its input size.
        train: The training recipe (stage train).
        evaluate: Test-split evaluation (stages evaluate and calibrate).
        calibrate: Softmax temperature scaling (stage calibrate).
        registry: The model registry and its promotion rule.
        data: Where the images and labels come from (stage prepare).
        validate: Data checks before sharding (stage validate, great-expectations).
        split: The stratified train/val/test split (stage shard).
        shard: How the WebDataset shards are written (stage shard).
        base_params: The params file the sections apply to, relative to workdir; none: the built-in defaults.
        workdir: The directory relative paths in the configuration resolve against.
    """
    logger = get_run_logger()
    layout = Layout(Path(workdir).resolve())
    sections = dict(zip(SECTIONS, (model, train, evaluate, calibrate, registry, data, validate, split, shard)))
    cfg = config_from_parameters(base_params, layout.root, sections)
    store_root = layout.resolve(cfg.schedule.cache_root)
    keys = plan_keys(cfg, layout)
    logger.info("config %s; stage keys: %s", cfg.hash(), ", ".join(f"{s}={k}" for s, k in keys.items()))
    results: dict[str, dict[str, Any]] = {}
    for spec in stored_stages():
        where = StageDir(store_root, spec.name, keys[spec.name])
        inputs = {up: results[up]["path"] for up in spec.upstream}
        stored = where.complete() is not None
        task_obj = stage_task.with_options(name=spec.name, result_storage=store_root / ".prefect")
        result = task_obj(cfg, where, inputs, str(layout.root))
        results[spec.name] = {**result, "path": str(where.path), "how": "hit" if stored else result["how"]}
    registered = register_task(cfg, str(layout.root), results, _flow_run_id())
    artifacts = publish_task(results, registered)
    metrics = results["evaluate"]["summary"]
    return {
        "config_hash": cfg.hash(),
        "stages": {s: {"key": r["key"], "path": r["path"], "how": r["how"]} for s, r in results.items()},
        "model_id": registered["model_id"],
        "promoted": registered["decision"]["promote"],
        "decision": registered["decision"],
        "production_id": registered["production_id"],
        "metrics": {k: metrics.get(k) for k in reg.HEADLINE_METRICS},
        "artifacts": artifacts,
    }

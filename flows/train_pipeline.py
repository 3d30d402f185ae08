"""Flow ``train-pipeline``: prepare -> validate -> shard -> train -> calibrate -> evaluate -> register.

Every stage is a Prefect task calling the same function as ``astroflow <stage>`` and DVC, writing
into its content-addressed directory (``flows/cache.py``); the task's Prefect cache key is that
directory's key, so an unchanged stage is a cache hit in Prefect and on disk alike. Calibrate runs
before evaluate, as in the CLI, because the evaluation reports calibrated metrics. Training runs under
``torchrun`` in a subprocess, so the same flow uses one CPU process here and every GPU of a node (or
several nodes) on a GPU machine. After evaluation the model is registered and promoted to production
only if it beats the current one (``pipeline/registry.py``).
"""

from __future__ import annotations

import base64
import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows import config_from_parameters
from flows.cache import StageDir, plan_keys, run_stage
from pipeline import calibrate as calibrate_stage_fn
from pipeline import evaluate as evaluate_stage_fn
from pipeline import prepare as prepare_stage_fn
from pipeline import registry as reg
from pipeline import shards as shard_stage_fn
from pipeline import validate as validate_stage_fn
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
    dump_params,
)
from pipeline.errors import AstroflowError, ConfigError, ValidationFailed
from pipeline.io import read_json
from pipeline.layout import Layout

FLOW_NAME = "train-pipeline"
SECTIONS = ("data", "validate", "split", "shard", "model", "train", "evaluate", "calibrate", "registry")
"""params.yaml sections that are parameters of this flow; the rest come from ``base_params``."""

CHECKPOINT = "best.pt"
CALIBRATION = "calibration.json"
RDZV_ENV = "ASTROFLOW_RDZV_ENDPOINT"
LOG_TAIL_LINES = 40


class TrainingFailed(AstroflowError):
    """torchrun exited non-zero; the message carries the tail of its log."""


# ------------------------------------------------------------------ cache plumbing


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect's key is the stage directory's key (plus its token); None while the directory is incomplete."""
    where: StageDir = parameters["where"]
    key = where.prefect_key()
    logger = get_run_logger()
    if key is None:
        logger.info("cache miss %s %s", where.stage, where.key)
    else:
        logger.info("cache hit %s %s", where.stage, where.key)
    return key


def _result(where: StageDir, record: dict[str, Any]) -> dict[str, Any]:
    return {"stage": where.stage, "key": where.key, "path": str(where.path), "summary": record["summary"]}


def _run(where: StageDir, build: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    record, _ = run_stage(where, build, inputs=inputs, logger=get_run_logger(), announce=False)
    return _result(where, record)


# ------------------------------------------------------------------ stage tasks


@task(name="prepare", cache_key_fn=_stage_cache_key)
def prepare_task(cfg: Config, where: StageDir, workdir: str) -> dict[str, Any]:
    """Read the configured source into ``dataset.h5``."""

    def build(out: Path) -> dict[str, Any]:
        return prepare_stage_fn.prepare(cfg, out, workdir=Path(workdir), progress=False)

    return _run(where, build, {})


@task(name="validate", cache_key_fn=_stage_cache_key)
def validate_task(cfg: Config, where: StageDir, prepared: dict[str, Any]) -> dict[str, Any]:
    """Check the prepared data; a failure publishes the validation summary before failing the task."""

    def build(out: Path) -> dict[str, Any]:
        try:
            report = validate_stage_fn.validate(cfg, Path(prepared["path"]) / prepare_stage_fn.DATASET_FILE, out, progress=False)
        except ValidationFailed:
            summary = out / validate_stage_fn.SUMMARY_FILE
            if summary.is_file():
                create_markdown_artifact(key="validation-report", markdown=summary.read_text(), description="failed validation")
            raise
        return {k: report[k] for k in ("success", "num_rows", "data_hash", "class_counts", "duplicate_images")}

    return _run(where, build, {"prepare": prepared["key"]})


@task(name="shard", cache_key_fn=_stage_cache_key)
def shard_task(cfg: Config, where: StageDir, prepared: dict[str, Any], validated: dict[str, Any]) -> dict[str, Any]:
    """Stratified split into WebDataset shards."""

    def build(out: Path) -> dict[str, Any]:
        manifest = shard_stage_fn.shard(
            cfg,
            Path(prepared["path"]) / prepare_stage_fn.DATASET_FILE,
            out,
            validation_report=Path(validated["path"]) / validate_stage_fn.REPORT_FILE,
            progress=False,
        )
        return {
            "data_hash": manifest.get("data_hash"),
            "config_hash": manifest.get("config_hash"),
            "splits": {name: s.get("num_samples") for name, s in manifest["splits"].items()},
        }

    return _run(where, build, {"prepare": prepared["key"], "validate": validated["key"]})


def torchrun_command(cfg: Config, params: Path, shards_dir: Path, out_dir: Path, *, run_id: str) -> list[str]:
    """The ``torchrun`` command line for ``python -m pipeline.train`` with the configured processes and nodes.

    One node runs standalone (a local rendezvous); several need a c10d rendezvous endpoint, taken from
    ``$ASTROFLOW_RDZV_ENDPOINT`` (host:port of node 0), and the same command started on every node.
    """
    t = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc_per_node}", f"--nnodes={t.nnodes}"]
    if t.nnodes == 1:
        cmd.append("--standalone")
    else:
        endpoint = os.environ.get(RDZV_ENV)
        if not endpoint:
            raise ConfigError(f"train.nnodes is {t.nnodes}: set ${RDZV_ENV} to host:port of the rendezvous (node 0)")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=astroflow-{run_id}"]
    cmd += ["-m", "pipeline.train", "--params", str(params), "--shards", str(shards_dir), "--out", str(out_dir), "--quiet"]
    return cmd


def stream_command(
    cmd: list[str], logger: Any, *, name: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    """Run ``cmd``, forwarding each output line to ``logger``; on failure raise with the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    logger.info("running: %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, cwd=cwd, errors="replace"
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("%s", line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # the task was cancelled or crashed: do not leave trainers behind
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if rc != 0:
        name = name or Path(cmd[0]).name
        raise TrainingFailed(f"{name} exited with status {rc}; last {len(tail)} log lines:\n" + "\n".join(tail))


@task(name="train", cache_key_fn=_stage_cache_key)
def train_task(cfg: Config, where: StageDir, sharded: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Train under torchrun (in ``workdir``, like the CLI); its log streams into this task's log."""
    logger = get_run_logger()
    repo = str(Path(__file__).resolve().parents[1])

    def build(out: Path) -> dict[str, Any]:
        params = out / "params.yaml"
        dump_params(cfg, params)
        cmd = torchrun_command(cfg, params, Path(sharded["path"]), out, run_id=where.key)
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        stream_command(cmd, logger, name="torchrun", env=env, cwd=Path(workdir))
        if not (out / CHECKPOINT).is_file():
            raise TrainingFailed(f"torchrun succeeded but wrote no {CHECKPOINT} into {out}")
        metrics = out / "metrics.json"
        return read_json(metrics) if metrics.is_file() else {}

    return _run(where, build, {"shard": sharded["key"]})


@task(name="calibrate", cache_key_fn=_stage_cache_key)
def calibrate_task(cfg: Config, where: StageDir, sharded: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """Fit the softmax temperature on the validation split."""

    def build(out: Path) -> dict[str, Any]:
        return calibrate_stage_fn.calibrate(cfg, Path(sharded["path"]), Path(trained["path"]) / CHECKPOINT, out / CALIBRATION, progress=False)

    return _run(where, build, {"shard": sharded["key"], "train": trained["key"]})


@task(name="evaluate", cache_key_fn=_stage_cache_key)
def evaluate_task(
    cfg: Config, where: StageDir, sharded: dict[str, Any], trained: dict[str, Any], calibrated: dict[str, Any]
) -> dict[str, Any]:
    """Test-split metrics, report and confusion matrix, with the calibration applied."""

    def build(out: Path) -> dict[str, Any]:
        return evaluate_stage_fn.evaluate(
            cfg,
            Path(sharded["path"]),
            Path(trained["path"]) / CHECKPOINT,
            out,
            calibration=Path(calibrated["path"]) / CALIBRATION,
            progress=False,
        )

    return _run(where, build, {"shard": sharded["key"], "train": trained["key"], "calibrate": calibrated["key"]})


STAGE_TASKS = {
    "prepare": prepare_task,
    "validate": validate_task,
    "shard": shard_task,
    "train": train_task,
    "calibrate": calibrate_task,
    "evaluate": evaluate_task,
}


# ------------------------------------------------------------------ registry and artifacts


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


@task(name="register", cache_policy=NO_CACHE)
def register_task(cfg: Config, layout_root: str, results: dict[str, dict[str, Any]], flow_run_id: str | None) -> dict[str, Any]:
    """Register the trained model as a candidate with its lineage; promote it if it beats production."""
    from pipeline.checkpoint import model_id

    logger = get_run_logger()
    root = Layout(Path(layout_root)).resolve(cfg.registry.root)
    train_dir, eval_dir = Path(results["train"]["path"]), Path(results["evaluate"]["path"])
    checkpoint = train_dir / CHECKPOINT
    mid = model_id(checkpoint)
    metrics = results["evaluate"]["summary"]
    lineage = {
        "model_name": cfg.model.name,
        "config_hash": cfg.hash(),
        "stage_keys": {stage: r["key"] for stage, r in results.items()},
        "data_hash": results["prepare"]["summary"].get("data_hash"),
        "metrics": {k: metrics.get(k) for k in reg.HEADLINE_METRICS},
        "registry_metric": cfg.registry.metric,
        "temperature": results["calibrate"]["summary"].get("temperature"),
        "code": reg.code_version(),
        "flow_run_id": flow_run_id,
        "config": cfg.to_dict(),
    }
    reg.register_candidate(
        root,
        mid,
        checkpoint,
        metrics=metrics,
        lineage=lineage,
        calibration=Path(results["calibrate"]["path"]) / CALIBRATION,
        extra_files={"report.md": eval_dir / "report.md", "confusion.png": eval_dir / evaluate_stage_fn.CONFUSION_PNG},
    )
    decision = reg.promote_if_better(root, mid, cfg.registry.metric, context={"flow_run_id": flow_run_id})
    logger.info("model %s: %s (%s)", mid, "promoted to production" if decision.promote else "not promoted", decision.reason)
    return {"model_id": mid, "decision": decision.to_dict(), "production_id": reg.production_id(root), "registry": str(root)}


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


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
        table=[{"metric": k, "value": metrics[k]} for k in headline if metrics.get(k) is not None],
        description=f"Test-split metrics of model {mid}",
    )
    keys.append("retrain-metrics")
    per_class = [{"class": name, **values} for name, values in metrics.get("per_class", {}).items()]
    create_table_artifact(key="retrain-per-class", table=per_class, description=f"Per-class test metrics of model {mid}")
    keys.append("retrain-per-class")
    confusion = eval_dir / evaluate_stage_fn.CONFUSION_PNG
    report = (eval_dir / "report.md").read_text()
    if confusion.is_file():
        uri = _png_data_uri(confusion)
        report = report.replace(f"]({evaluate_stage_fn.CONFUSION_PNG})", f"]({uri})")
        create_image_artifact(image_url=uri, key="retrain-confusion-matrix", description=f"Test-split confusion matrix of model {mid}")
        keys.append("retrain-confusion-matrix")
    create_markdown_artifact(key="retrain-report", markdown=report, description=f"Evaluation report of model {mid}")
    keys.append("retrain-report")
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


def _with_storage(task_obj: Any, cache_root: Path) -> Any:
    """Prefect's result records beside the stage directories, so the cache lives in one place."""
    return task_obj.with_options(result_storage=cache_root / ".prefect")


@flow(name=FLOW_NAME, description="prepare -> validate -> shard -> train -> calibrate -> evaluate -> register/promote")
def train_pipeline(
    data: DataConfig = DataConfig(),
    validate: ValidateConfig = ValidateConfig(),
    split: SplitConfig = SplitConfig(),
    shard: ShardConfig = ShardConfig(),
    model: ModelConfig = ModelConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: EvaluateConfig = EvaluateConfig(),
    calibrate: CalibrateConfig = CalibrateConfig(),
    registry: RegistryConfig = RegistryConfig(),
    base_params: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """Train, evaluate and maybe promote a model; unchanged stages are reused from the cache.

    Each section parameter overrides only the fields it sets on top of ``base_params`` (a params.yaml,
    relative to ``workdir``); ``workdir`` is where relative paths in the config resolve.
    """
    logger = get_run_logger()
    layout = Layout(Path(workdir).resolve())
    sections = dict(zip(SECTIONS, (data, validate, split, shard, model, train, evaluate, calibrate, registry)))
    cfg = config_from_parameters(base_params, layout.root, sections)
    cache_root = layout.resolve(cfg.schedule.cache_root)
    keys = plan_keys(cfg, layout)
    where = {stage: StageDir(cache_root, stage, key) for stage, key in keys.items()}
    hits = {stage: w.complete() is not None for stage, w in where.items()}
    logger.info(
        "config %s; stage keys: %s; already built: %s",
        cfg.hash(),
        ", ".join(f"{s}={k}" for s, k in keys.items()),
        ", ".join(s for s, hit in hits.items() if hit) or "none",
    )
    tasks = {name: _with_storage(t, cache_root) for name, t in STAGE_TASKS.items()}
    results: dict[str, dict[str, Any]] = {}

    def run(stage: str, *inputs: Any) -> dict[str, Any]:
        out = tasks[stage](cfg, where[stage], *inputs)
        results[stage] = {**out, "path": str(where[stage].path)}  # the directory here, not one a Prefect record remembers
        return results[stage]

    prepared = run("prepare", str(layout.root))
    validated = run("validate", prepared)
    sharded = run("shard", prepared, validated)
    trained = run("train", sharded, str(layout.root))
    calibrated = run("calibrate", sharded, trained)
    run("evaluate", sharded, trained, calibrated)
    registered = register_task(cfg, str(layout.root), results, _flow_run_id())
    artifacts = publish_task(results, registered)
    metrics = results["evaluate"]["summary"]
    return {
        "config_hash": cfg.hash(),
        "stages": {s: {"key": r["key"], "path": r["path"], "hit": hits[s]} for s, r in results.items()},
        "model_id": registered["model_id"],
        "promoted": registered["decision"]["promote"],
        "decision": registered["decision"],
        "production_id": registered["production_id"],
        "metrics": {k: metrics.get(k) for k in reg.HEADLINE_METRICS},
        "artifacts": artifacts,
    }

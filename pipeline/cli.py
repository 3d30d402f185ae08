"""``astroflow``: one sub-command per stage, plus ``run`` (every stage in order) and helpers.

Every command takes ``--params`` (default: ``params.yaml`` in the working directory if present,
else the built-in defaults), repeatable ``--set section.key=value`` and ``--workdir``. The whole
config is validated before any work starts. Errors meant for people print one message, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, dump_params, load_config
from pipeline.errors import AstroflowError, ValidationFailed
from pipeline.io import atomic_write_json
from pipeline.layout import Layout

DATASET = "dataset.h5"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None, help="params file (default: WORKDIR/params.yaml if present)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one parameter (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where data/, metrics/ and plots/ live (default: .)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> tuple[Config, Layout]:
    layout = Layout(args.workdir.resolve())
    params = args.params
    if params is None and (layout.root / "params.yaml").is_file():
        params = layout.root / "params.yaml"
    return load_config(params, args.overrides), layout


def _say(message: str) -> None:
    print(f"astroflow: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ stages


def cmd_prepare(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.prepare import prepare

    summary = prepare(cfg, layout.prepared, workdir=layout.root, progress=not args.quiet)
    _say(f"prepared {summary['num_images']} images {tuple(summary['image_shape'])} -> {layout.prepared / DATASET}")
    return summary


def cmd_validate(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.validate import validate

    report = validate(cfg, layout.prepared / DATASET, layout.validation, progress=not args.quiet)
    _say(f"validation passed: {layout.validation / 'summary.md'}")
    return report


def cmd_shard(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.shards import shard

    manifest = shard(
        cfg,
        layout.prepared / DATASET,
        layout.shards,
        validation_report=layout.validation / "report.json",
        progress=not args.quiet,
    )
    counts = ", ".join(f"{k} {v['num_samples']} ({len(v['shards'])} shards)" for k, v in manifest["splits"].items())
    _say(f"sharded: {counts}; manifest {layout.shards / 'manifest.json'}")
    return manifest


def cmd_train(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.train import train

    result = train(cfg, layout.shards, layout.train, resume=getattr(args, "resume", False), progress=not args.quiet)
    _say(f"trained: best checkpoint {layout.train / 'best.pt'}")
    return result


def cmd_calibrate(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.calibrate import calibrate

    result = calibrate(cfg, layout.shards, layout.train / "best.pt", layout.calibration_file, progress=not args.quiet)
    _say(f"calibrated: T={result['temperature']:.3f}, val ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}")
    return result


def cmd_evaluate(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.evaluate import evaluate

    calibration = layout.calibration_file if layout.calibration_file.is_file() else None
    metrics = evaluate(
        cfg,
        layout.shards,
        layout.train / "best.pt",
        layout.evaluation,
        calibration=calibration,
        metrics_path=layout.metrics / "eval.json",
        progress=not args.quiet,
    )
    _say(f"test top-1 {metrics['top1']:.4f}, macro-F1 {metrics['macro_f1']:.4f}; report {layout.evaluation / 'report.md'}")
    return metrics


STAGES: dict[str, Callable[[Config, Layout, argparse.Namespace], dict[str, Any]]] = {
    "prepare": cmd_prepare,
    "validate": cmd_validate,
    "shard": cmd_shard,
    "train": cmd_train,
    "calibrate": cmd_calibrate,
    "evaluate": cmd_evaluate,
}


def cmd_run(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in order under one directory, without DVC or Prefect."""
    layout.root.mkdir(parents=True, exist_ok=True)
    dump_params(cfg, layout.root / "params.resolved.yaml")
    timings: dict[str, float] = {}
    result: dict[str, Any] = {}
    for name, fn in STAGES.items():
        _say(f"== {name}")
        t0 = time.perf_counter()
        result = fn(cfg, layout, args)
        timings[name] = round(time.perf_counter() - t0, 2)
    _say("stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return result


def cmd_predict(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.predict import predict

    if args.input is not None:
        cfg.predict.input = str(args.input)
    if args.input_kind is not None:
        cfg.predict.input_kind = args.input_kind
    if args.backend is not None:
        cfg.predict.backend = args.backend
    if args.tta:
        cfg.predict.tta = True
    checkpoint = layout.resolve(args.checkpoint) if args.checkpoint else layout.train / "best.pt"
    calibration = args.calibration or (layout.calibration_file if layout.calibration_file.is_file() else None)
    summary = predict(
        cfg,
        checkpoint,
        layout.resolve(cfg.predict.input) if cfg.predict.input else None,
        layout.resolve(args.output or cfg.predict.output),
        calibration=calibration,
        shards_dir=layout.shards,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    if args.summary is not None:
        atomic_write_json(layout.resolve(args.summary), json.loads(json.dumps(summary, default=str)))
    if summary.get("num_errors"):
        _say(f"{summary['num_errors']} input(s) could not be classified; see the errors table")
        raise SystemExit(3)
    return summary


def cmd_export(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.export import export_onnx

    checkpoint = layout.resolve(args.checkpoint) if args.checkpoint else layout.train / "best.pt"
    out = layout.resolve(args.output) if args.output else checkpoint.with_suffix(".onnx")
    export_onnx(checkpoint, out)
    _say(f"exported {checkpoint} -> {out}")
    return {"onnx": str(out)}


def cmd_models(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    import models
    from models.summary import describe_model, format_table

    names = args.names or [*models.ASTROFORMER_MODELS, "coatnet_0_224", "mobilevit_s", "efficientnetv2_rw_s", "resnet18"]
    size = args.img_size or cfg.model.img_size
    rows = []
    for name in names:
        rows.append(describe_model(name, img_size=size, num_classes=cfg.data.num_classes))
    print(format_table(rows))
    return {"models": rows}


def cmd_download(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.sources.galaxy10 import ensure_galaxy10

    path = ensure_galaxy10(cfg.data, layout, progress=not args.quiet)
    _say(f"Galaxy10 DECals verified at {path}")
    return {"path": str(path)}


def cmd_params(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return {}


def cmd_serve(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from flows.serve import serve

    serve(cfg, layout, params_path=args.params)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astroflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "prepare": "read the configured source into data/prepared/dataset.h5",
        "validate": "check the prepared data with great-expectations",
        "shard": "stratified split and WebDataset shards in data/shards",
        "train": "train the configured model on the shards",
        "calibrate": "fit a softmax temperature on the validation split",
        "evaluate": "test-split metrics, confusion matrix and report",
        "run": "every stage in order under --workdir (no DVC or Prefect needed)",
        "predict": "classify images into the Parquet catalog",
        "export": "export the trained model (ONNX)",
        "models": "list models with parameter counts and GMACs",
        "download": "download and verify the Galaxy10 DECals file",
        "params": "print the full resolved configuration",
        "serve": "serve the Prefect deployments (retrain, nightly-catalog)",
    }
    subs = {name: sub.add_parser(name, help=text, description=text) for name, text in helps.items()}
    for p in subs.values():
        _common(p)
    subs["train"].add_argument("--resume", action="store_true", help="continue from data/train/last.pt")
    subs["predict"].add_argument("--input", type=Path, default=None, help="h5 file, shard dir, image folder or Zoobot catalog (default: predict.input, else the test split)")
    subs["predict"].add_argument("--input-kind", choices=["auto", "h5", "shards", "folder", "zoobot"], default=None, help="default: predict.input_kind (auto: from the path)")
    subs["predict"].add_argument("--checkpoint", type=Path, default=None, help="default: data/train/best.pt")
    subs["predict"].add_argument("--calibration", type=Path, default=None, help="temperature JSON (default: data/calibration/calibration.json if present)")
    subs["predict"].add_argument("--output", type=Path, default=None, help="catalog root (default: predict.output)")
    subs["predict"].add_argument("--backend", choices=["torch", "onnx"], default=None)
    subs["predict"].add_argument("--tta", action="store_true", help="average the 8 rotations/flips")
    subs["predict"].add_argument("--summary", type=Path, default=None, help="also write the run summary JSON here (the DVC stage's metrics file)")
    subs["export"].add_argument("--format", choices=["onnx"], default="onnx")
    subs["export"].add_argument("--checkpoint", type=Path, default=None)
    subs["export"].add_argument("--output", type=Path, default=None)
    subs["models"].add_argument("names", nargs="*", help="model names (default: the Astroformer family and baselines)")
    subs["models"].add_argument("--img-size", type=int, default=None, help="default: model.img_size")
    return parser


COMMANDS: dict[str, Callable[[Config, Layout, argparse.Namespace], dict[str, Any]]] = {
    **STAGES,
    "run": cmd_run,
    "predict": cmd_predict,
    "export": cmd_export,
    "models": cmd_models,
    "download": cmd_download,
    "params": cmd_params,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, layout = _config(args)
        COMMANDS[args.command](cfg, layout, args)
    except ValidationFailed as exc:
        _say(f"error: {exc}")
        return 1
    except AstroflowError as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; completed outputs are intact, partial ones were discarded")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""astroflow: one command per pipeline stage, plus run (every stage in order) and helpers.

Every command takes --params (default: params.yaml in the working directory if present, else the
built-in defaults), repeatable --set section.key=value and --workdir. The whole config is validated
before any work starts. Errors meant for people print one message, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, dump_params, load_config
from pipeline.errors import AstroflowError, ConfigError, ValidationFailed
from pipeline.layout import Layout
from pipeline.orchestrate.graph import STAGES

EXIT_REFUSED = 1
"""A check said no: failed validation, a stale dvc.yaml, a promotion the registry rule refused."""
EXIT_PARTIAL = 3
"""Finished, but some inputs could not be processed (listed in the output)."""


class DvcYamlOutdated(ValidationFailed):
    """The committed dvc.yaml is not what the graph generates (exit 1, like a failed check)."""


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("astroflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _say(message: str) -> None:
    print(f"astroflow: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ stages (from the graph)


def _run_stage(name: str, cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.orchestrate.graph import GRAPH
    from pipeline.orchestrate.runner import run_in_workspace

    outcome = run_in_workspace(
        name, cfg, layout, progress=not args.quiet, resume=getattr(args, "resume", False), force=getattr(args, "force", False)
    )
    line = getattr(importlib.import_module(GRAPH[name].module), "summary_line", None)
    detail = f": {line(outcome.summary)}" if line else ""
    _say(f"{name} {outcome.how} in {outcome.seconds:.1f}s -> {outcome.path}{detail}")
    if outcome.summary.get("num_errors"):
        _say(f"{outcome.summary['num_errors']} input(s) could not be classified; see the errors table")
        raise SystemExit(EXIT_PARTIAL)
    return outcome.summary


def _stage_command(name: str) -> Callable[[Config, Layout, argparse.Namespace], dict[str, Any]]:
    def command(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
        if name == "train" and args.print_command:
            return _print_torchrun(cfg, layout)
        if name == "train" and (args.out or args.shards):
            return _train_process(cfg, layout, args)
        return _run_stage(name, cfg, layout, args)

    return command


def _print_torchrun(cfg: Config, layout: Layout) -> dict[str, Any]:
    """The torchrun command of this config, to start by hand on each node of a multi-node run."""
    import shlex

    from pipeline.orchestrate.launch import torchrun_command

    params = layout.root / "params.resolved.yaml"
    dump_params(cfg, params)
    cmd = torchrun_command(cfg, params, layout.shards, layout.train, run_id=cfg.hash())
    print(shlex.join(cmd))
    return {"command": cmd}


def _train_process(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Training in this process into ``--out``, outside the store: what torchrun starts on every rank.

    Not a stage run, so nothing is recorded and no second torchrun is launched; epoch lines go to the log,
    which the launcher streams.
    """
    import logging

    from pipeline.learn.train import train

    if args.out is None:
        raise ConfigError("--shards needs --out (the directory to train into)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(cfg, args.shards or layout.shards, args.out, resume=args.resume, progress=not args.quiet)


def cmd_run(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage of the graph in order under one directory, without DVC or Prefect."""
    from pipeline.orchestrate.runner import refuse_overwrite

    for stage in STAGES:  # before any stage runs, not after the data stages
        refuse_overwrite(stage.name, layout, resume=args.resume, force=args.force)
    layout.root.mkdir(parents=True, exist_ok=True)
    dump_params(cfg, layout.root / "params.resolved.yaml")
    timings: dict[str, float] = {}
    result: dict[str, Any] = {}
    started = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        _say(f"stage {i}/{len(STAGES)} {stage.name}: {stage.help} ({time.perf_counter() - started:.0f}s since the start)")
        t0 = time.perf_counter()
        result = _run_stage(stage.name, cfg, layout, args)
        timings[stage.name] = round(time.perf_counter() - t0, 2)
    _say("stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return result


def cmd_predict(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Without arguments: the DVC ``predict`` stage. With any: classify what they name into a catalog root."""
    if not any(getattr(args, k) is not None for k in ("input", "checkpoint", "calibration", "output", "dask")):
        return _run_stage("predict", cfg, layout, args)
    from pipeline.catalog.distributed import predictor
    from pipeline.io import check_writable

    if args.input is not None:
        cfg.predict.input = str(Path(args.input).resolve())
    if args.input_kind is not None:
        cfg.predict.input_kind = args.input_kind
    if args.backend is not None:
        cfg.predict.backend = args.backend
    if args.tta:
        cfg.predict.tta = True
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else layout.train / "best.pt"
    calibration = args.calibration.resolve() if args.calibration else None
    if calibration is None and layout.calibration_file.is_file():
        calibration = layout.calibration_file
    out_root = Path(args.output).resolve() if args.output else layout.resolve(cfg.schedule.catalog)
    check_writable(out_root)
    summary = predictor(args.dask)(
        cfg,
        checkpoint,
        layout.resolve(cfg.predict.input) if cfg.predict.input else None,
        out_root,
        calibration=calibration,
        shards_dir=layout.shards,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    if summary.get("num_errors"):
        _say(f"{summary['num_errors']} input(s) could not be classified; see the errors table")
        raise SystemExit(EXIT_PARTIAL)
    return summary


def cmd_export(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.score.export import export_onnx

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
    from pipeline.data.sources.galaxy10 import ensure_galaxy10

    path = ensure_galaxy10(cfg.data, layout, progress=not args.quiet)
    _say(f"Galaxy10 DECals verified at {path}")
    return {"path": str(path)}


def cmd_params(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration as YAML; with --explain each key has its description above it as a comment."""
    import yaml

    if args.explain:
        print("\n".join(_explained(cfg)))
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return {}


def _explained(section: Any, indent: str = "") -> list[str]:
    """YAML lines of ``section`` with each field's description (the text the Prefect form shows) as a comment."""
    import textwrap

    import yaml
    from pydantic import BaseModel

    values = section.model_dump(mode="json", by_alias=True)
    lines = []
    for name, field in type(section).model_fields.items():
        key = field.alias or name
        lines += textwrap.wrap(field.description or "", 116 - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            lines += [f"{indent}{key}:", *_explained(value, indent + "  ")]
        else:
            flow = None if isinstance(values[key], (list, dict)) else False  # lists on one line, scalars as key: value
            dumped = yaml.safe_dump({key: values[key]}, default_flow_style=flow, sort_keys=False, width=10_000)
            lines += [indent + line for line in dumped.rstrip("\n").splitlines()]
    return lines


def cmd_nightly(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """The nightly catalog without a Prefect server (in this process, or its chunks on --dask): the flow's function."""
    from pipeline.catalog.distributed import dask_client, dask_submit
    from pipeline.catalog.nightly import run_nightly

    if args.inbox is not None:
        cfg.schedule.inbox = str(Path(args.inbox).resolve())
    if args.catalog is not None:
        cfg.schedule.catalog = str(Path(args.catalog).resolve())
    if args.dask is None:
        summary = run_nightly(cfg, layout)
    else:
        with dask_client(args.dask) as client:
            summary = run_nightly(cfg, layout, dask_submit(client))
    print(json.dumps(summary, indent=2, default=str))
    if summary["failed"]:
        _say(f"{len(summary['failed'])} input(s) failed and stay unrecorded; run again to retry them")
        raise SystemExit(EXIT_PARTIAL)
    return summary


def cmd_dvc_yaml(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Write dvc.yaml from the stage graph, or with --check fail when the file differs from it."""
    from pipeline.orchestrate import dvcfile

    path = layout.root / "dvc.yaml"
    if args.mermaid:
        from pipeline.orchestrate.graph import mermaid

        print(mermaid())
        return {}
    if args.check:
        differ = dvcfile.check(path)
        if differ:
            raise DvcYamlOutdated(f"{path}: differs from the stage graph in {', '.join(differ)}; run `astroflow dvc-yaml`")
        _say(f"{path} matches the stage graph")
        return {}
    _say(f"{path} {'written' if dvcfile.write(path) else 'already up to date'}")
    return {}


def cmd_registry(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """The model registry under ``registry.root``; the rule and the files are ``pipeline.score.registry``'s."""
    from pipeline.score import registry as reg

    root = layout.resolve(cfg.registry.root)
    if args.action == "list":
        rows = reg.list_models(root)
        print(reg.format_models(rows) if rows else f"no registered model in {root}")
        return {"models": rows}
    if args.action == "show":
        record = reg.show(root, args.model_id)
        print(json.dumps(record, indent=2, default=str))
        return record
    if args.action == "register":
        mid = reg.register_model(
            root,
            cfg,
            checkpoint=layout.train / "best.pt",
            calibration=layout.calibration_file if layout.calibration_file.is_file() else None,
            eval_dir=layout.evaluation,
            shards_dir=layout.shards,
            source="dvc workspace",
        )
        _say(f"registered {mid} in {root}")
        return {"model_id": mid}
    if args.action == "rollback":
        mid = reg.rollback(root, reason=args.reason)
        _say(f"rolled back: production is {mid} again")
        return {"model_id": mid}
    mid = args.model_id or reg.latest_id(root)
    decision = reg.promote(root, mid, cfg, shards_dir=args.shards, force=args.force, reason=args.reason)
    _say(f"{mid}: {'promoted to production' if decision.promote else 'not promoted'} ({decision.reason})")
    if not decision.promote:
        raise SystemExit(EXIT_REFUSED)
    return decision.to_dict()


def cmd_catalog(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """``catalog export``: the complete runs of a catalog root (default: the nightly catalog) as one file.
    ``catalog compact``: merge each complete run's chunk files (nightly catalog roots only)."""
    from pipeline.catalog.export import export_catalog

    root = args.catalog.resolve() if args.catalog else layout.resolve(cfg.schedule.catalog)
    if args.action == "compact":
        return _compact(root, layout)
    result = export_catalog(root, args.output.resolve(), args.format, run=args.run, force=args.force)
    _say(f"exported {result['rows']} rows of {len(result['runs'])} run(s) of {root} -> {result['output']} ({args.format})")
    return result


def _compact(root: Path, layout: Layout) -> dict[str, Any]:
    from pipeline.catalog.compact import check_compactable, compact

    check_compactable(root, layout.stage_dir("predict"))
    result = compact(root)
    print(json.dumps(result, indent=2))
    _say(f"compacted {len(result['runs'])} partition(s) of {root}: {result['files_before']} files -> {result['files_after']}")
    return result


def cmd_compare(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    """Candidates over repeated splits at an equal budget; prints the table, which records how to reproduce it."""
    import logging
    import shlex

    from pipeline.score.compare import compare

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = ["--params", str(args.params)] if args.params else []
    sets = [x for o in args.overrides for x in ("--set", o)]
    command = shlex.join(["astroflow", "compare", *params, *sets, "--workdir", str(args.workdir)])
    result = compare(cfg, layout, overrides=args.overrides, force=args.force, command=command)
    print(result["markdown"] + ("\n" + result["paired_markdown"] if result["paired_markdown"] else ""))
    _say(f"wrote {result['out']}")
    return result


def cmd_serve(cfg: Config, layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    from flows.serve import serve

    serve(cfg, layout, params_path=args.params)
    return {}


EXAMPLES: dict[str, tuple[str, ...]] = {
    "prepare": ("astroflow prepare", "astroflow prepare --set data.source=h5 --set data.path=survey.h5"),
    "validate": ("astroflow validate", "astroflow validate --set validate.min_class_count=50"),
    "shard": ("astroflow shard", "astroflow shard --set split.seed=7 --set shard.image_format=npy"),
    "train": (
        "astroflow train --force --set train.epochs=5",
        "astroflow train --resume",
        "astroflow train --print-command --params configs/astroformer_galaxy10.yaml",
    ),
    "calibrate": ("astroflow calibrate",),
    "evaluate": ("astroflow evaluate", "astroflow evaluate --set evaluate.tta=true"),
    "predict": (
        "astroflow predict",
        "astroflow predict --input /data/new_cutouts/",
        "astroflow predict --input survey.h5 --backend onnx --output catalog/",
        "astroflow predict --input survey.h5 --dask tcp://scheduler:8786",
    ),
    "run": (
        "astroflow run --workdir runs/demo",
        "astroflow run --workdir runs/demo --force --set train.epochs=5",
        "astroflow run --workdir runs/mine --set data.source=h5 --set data.path=survey.h5",
    ),
    "export": ("astroflow export --format onnx", "astroflow export --format onnx --output model.onnx"),
    "models": ("astroflow models", "astroflow models astroformer_0 resnet18 --img-size 256"),
    "download": ("astroflow download", "astroflow download --set data.galaxy10.cache_dir=/scratch/galaxy10"),
    "params": (
        "astroflow params",
        "astroflow params --explain",
        "astroflow params --params configs/astroformer_galaxy10.yaml --set train.epochs=10",
    ),
    "dvc-yaml": ("astroflow dvc-yaml", "astroflow dvc-yaml --check", "astroflow dvc-yaml --mermaid"),
    "compare": (
        "astroflow compare",
        "astroflow compare --force --set compare.budget=seconds --set compare.seconds=1800",
        "astroflow compare --set compare.splits=5 --set train.epochs=40",
    ),
    "serve": ("astroflow serve", "PREFECT_API_URL=http://127.0.0.1:4200/api astroflow serve --params params.yaml"),
    "nightly": ("astroflow nightly", "astroflow nightly --inbox /data/inbox --catalog /data/catalog", "astroflow nightly --dask local:2"),
    "registry": ("astroflow registry list", "astroflow registry promote --reason 'better macro-F1'"),
    "registry list": ("astroflow registry list",),
    "registry show": ("astroflow registry show", "astroflow registry show MODEL_ID"),
    "registry register": ("astroflow registry register",),
    "registry promote": ("astroflow registry promote", "astroflow registry promote MODEL_ID --force --reason 'hand-checked'"),
    "registry rollback": ("astroflow registry rollback --reason 'worse on new data'",),
    "catalog": ("astroflow catalog export --format fits --output catalog.fits", "astroflow catalog compact"),
    "catalog compact": ("astroflow catalog compact", "astroflow catalog compact --catalog /data/nightly-catalog"),
    "catalog export": (
        "astroflow catalog export --format fits --output catalog.fits",
        "astroflow catalog export --format votable --output run.vot --run RUN_ID --catalog data/catalog",
    ),
}
"""Examples shown at the end of each command's --help, keyed by the command after ``astroflow``."""


def _with_examples(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every (sub-)command's --help ends with its examples, printed as written."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                examples = EXAMPLES.get(sub.prog.removeprefix(f"{parser.prog.split()[0]} "), ())
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
                sub.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
                _with_examples(sub)
    return parser


def _subcommands(sub: Any, helps: dict[str, str]) -> dict[str, argparse.ArgumentParser]:
    """One sub-parser per (name, help), each with the common options."""
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in helps.items()}
    for parser in parsers.values():
        _common(parser)
    return parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astroflow",
        description=__doc__.splitlines()[0],
        epilog="examples:\n  astroflow run --workdir runs/demo\n  astroflow params --explain\n  astroflow COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"astroflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        **{stage.name: stage.help for stage in STAGES},
        "run": "every stage in order under --workdir (no DVC or Prefect needed)",
        "export": "export the trained model (ONNX)",
        "models": "list models with parameter counts and GMACs",
        "download": "download and verify the Galaxy10 DECals file",
        "params": "print the full resolved configuration",
        "dvc-yaml": "write dvc.yaml from the stage graph (--check: fail if it differs)",
        "serve": "serve the Prefect deployments (retrain, nightly-catalog)",
        "nightly": "classify new inbox inputs with the production model into the nightly catalog (no Prefect)",
        "compare": "candidates (compare.candidates) over repeated splits at an equal budget: tables with bootstrap intervals",
    }
    subs = _subcommands(sub, helps)
    subs["train"].add_argument("--resume", action="store_true", help="continue from last.pt (in data/train, or in OUT with --out)")
    for name in ("train", "run"):
        subs[name].add_argument("--force", action="store_true", help="replace a training run already in data/train")
    subs["compare"].add_argument("--force", action="store_true", help="replace a finished table in compare.out (finished runs are reused)")
    subs["run"].add_argument("--resume", action="store_true", help="continue the training run in data/train")
    subs["train"].add_argument("--out", type=Path, default=None, help="train in this process into OUT, outside the store, without launching torchrun (what torchrun starts on each rank)")
    subs["train"].add_argument("--shards", type=Path, default=None, help="with --out: the shard directory (default: data/shards under --workdir)")
    subs["train"].add_argument("--print-command", action="store_true", help="print the torchrun command for this config (multi-node: run it on each node)")
    subs["predict"].add_argument("--input", type=Path, default=None, help="h5 file, shard dir, image folder or Zoobot catalog (default: predict.input, else the test split)")
    subs["predict"].add_argument("--input-kind", choices=["auto", "h5", "shards", "folder", "zoobot"], default=None, help="default: predict.input_kind (auto: from the path)")
    subs["predict"].add_argument("--checkpoint", type=Path, default=None, help="default: data/train/best.pt")
    subs["predict"].add_argument("--calibration", type=Path, default=None, help="temperature JSON (default: data/calibration/calibration.json if present)")
    subs["predict"].add_argument("--output", type=Path, default=None, help="catalog root (default: schedule.catalog; the DVC stage's data/catalog is written only without arguments)")
    subs["predict"].add_argument("--backend", choices=["torch", "onnx"], default=None)
    subs["predict"].add_argument("--tta", action="store_true", help="average the views of the model's training symmetry (4 rotations, or 8 with flips)")
    subs["params"].add_argument("--explain", action="store_true", help="each key with its description, as YAML comments")
    subs["dvc-yaml"].add_argument("--check", action="store_true", help="exit 1 when dvc.yaml differs from the graph")
    subs["dvc-yaml"].add_argument("--mermaid", action="store_true", help="print the stage graph as a Mermaid diagram instead")
    subs["export"].add_argument("--format", choices=["onnx"], default="onnx")
    subs["export"].add_argument("--checkpoint", type=Path, default=None)
    subs["export"].add_argument("--output", type=Path, default=None)
    subs["models"].add_argument("names", nargs="*", help="model names (default: the Astroformer family and baselines)")
    subs["models"].add_argument("--img-size", type=int, default=None, help="default: model.img_size")
    subs["nightly"].add_argument("--inbox", type=Path, default=None, help="default: schedule.inbox")
    subs["nightly"].add_argument("--catalog", type=Path, default=None, help="catalog root (default: schedule.catalog)")
    for name in ("predict", "nightly"):
        subs[name].add_argument("--dask", default=None, metavar="ADDRESS", help="run the chunks as tasks on this Dask scheduler (tcp://host:8786), or on a local cluster of N worker processes (local:N); docs/scale.md")
    registry = sub.add_parser("registry", help="list, show, register, promote or roll back models", description="the model registry (registry.root)")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    registry_helps = {
        "list": "every registered model; * marks production",
        "show": "one model's lineage, metrics and history (default: production)",
        "register": "register the model `dvc repro` / `astroflow run` trained in the workdir",
        "promote": "promote by the registry rule (default: the latest registered model)",
        "rollback": "put the previous production model back",
    }
    reg_subs = _subcommands(actions, registry_helps)
    for name in ("show", "promote"):
        reg_subs[name].add_argument("model_id", nargs="?", default=None, metavar="MODEL_ID")
    for name in ("promote", "rollback"):
        reg_subs[name].add_argument("--reason", default=None, help="why; recorded in the registry history")
    reg_subs["promote"].add_argument("--force", action="store_true", help="promote whatever the rule says (needs --reason)")
    reg_subs["promote"].add_argument("--shards", type=Path, default=None, help="the candidate's shards (default: those it was registered with)")
    catalog = sub.add_parser("catalog", help="export the prediction catalog as one file, or compact it", description="the prediction catalog (docs/catalog.md)")
    catalog_actions = catalog.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = _subcommands(catalog_actions, {"export": "write the catalog's complete runs to one file with units, descriptions and provenance"})["export"]
    export.add_argument("--format", required=True, choices=["fits", "votable", "ecsv", "parquet", "csv"])
    export.add_argument("--output", type=Path, required=True, help="the file to write (relative to the current directory)")
    export.add_argument("--run", default=None, help="only this run id (default: every complete run)")
    export.add_argument("--catalog", type=Path, default=None, help="catalog root (default: schedule.catalog, the nightly catalog)")
    export.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    compact = _subcommands(catalog_actions, {"compact": "merge each complete run's chunk files into large files, atomically (nightly catalog only)"})["compact"]
    compact.add_argument("--catalog", type=Path, default=None, help="catalog root (default: schedule.catalog, the nightly catalog)")
    return _with_examples(parser)


COMMANDS: dict[str, Callable[[Config, Layout, argparse.Namespace], dict[str, Any]]] = {
    **{stage.name: _stage_command(stage.name) for stage in STAGES},
    "run": cmd_run,
    "predict": cmd_predict,
    "export": cmd_export,
    "models": cmd_models,
    "download": cmd_download,
    "params": cmd_params,
    "dvc-yaml": cmd_dvc_yaml,
    "serve": cmd_serve,
    "compare": cmd_compare,
    "nightly": cmd_nightly,
    "registry": cmd_registry,
    "catalog": cmd_catalog,
}


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}
"""OSErrors a person causes (permissions, a full or read-only disk, a file where a directory belongs): exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, layout = _config(args)
        COMMANDS[args.command](cfg, layout, args)
    except SystemExit as exc:  # a command's own verdict (EXIT_REFUSED, EXIT_PARTIAL)
        return int(exc.code or 0)
    except ValidationFailed as exc:
        _say(f"error: {exc}")
        return EXIT_REFUSED
    except AstroflowError as exc:
        _say(f"error: {exc}")
        return 2
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS or exc.filename is None:
            raise
        _say(f"error: {exc.filename2 or exc.filename}: {exc.strerror} (check the path, its permissions and the free space)")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; completed outputs are intact, partial ones were discarded")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage ``validate``: check the prepared dataset with great-expectations before anything trains on it.

Images never go to great-expectations: one streaming pass over the prepared file (:mod:`pipeline.data.scan`)
reduces every image to a few scalars (shape, dtype, blank, NaN count, duplicate of an earlier row), and the
expectations run on that small per-row table, so peak memory is one chunk of images whatever the file size.
Row indices in the report are positions in the prepared file (the DataFrame keeps a RangeIndex).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.errors import ConfigError, DataError, ValidationFailed
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.layout import StageRun
from pipeline.data.pixels import Geometry
from pipeline.data.prepare import PreparedDataset
from pipeline.data.scan import scan

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"

# GE's `mostly` compares (n - bad) / n >= mostly in floats; this slack keeps a fraction that is exactly
# at the configured limit (1 of 3 rows missing with max_missing_coordinates = 1/3) on the passing side.
_MOSTLY_SLACK = 1e-12

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Expectations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One expectation plus the table it runs on and a stable short name for reports and messages."""

    key: str
    table: str  # "rows" (examples are row indices) or "classes" (examples are class indices)
    type: str  # the GE expectation class name
    column: str
    kwargs: dict[str, Any]
    description: str


def declared_shape(cfg: Config) -> tuple[int | None, int | None, int]:
    """The (H, W, C) every image must have; None = any (the rule in ``ValidateConfig.image_shape``)."""
    shape = cfg.validate_.image_shape
    if shape is not None:
        if len(shape) != 3 or any(int(s) <= 0 for s in shape):
            raise ConfigError(f"validate.image_shape: expected [height, width, channels] > 0, got {shape}")
        return int(shape[0]), int(shape[1]), int(shape[2])
    if cfg.data.source == "synthetic":
        size = cfg.data.synthetic.image_size
        return Geometry.of(cfg.data).shape((size, size, 3))
    return None, None, 3


def declared_dtype(cfg: Config) -> str:
    try:
        return np.dtype(cfg.validate_.image_dtype).name
    except TypeError as exc:
        raise ConfigError(f"validate.image_dtype: {cfg.validate_.image_dtype!r} is not a numpy dtype") from exc


def build_checks(cfg: Config, num_rows: int) -> list[Check]:
    """The expectations of the stage, from the config alone (the data decides only pass or fail)."""
    vcfg = cfg.validate_
    num_classes = cfg.data.num_classes
    mostly_coords = max(0.0, 1.0 - vcfg.max_missing_coordinates - _MOSTLY_SLACK)
    allowed_dups = min(vcfg.max_duplicate_images, num_rows)
    # Same arithmetic as GE's success ratio, so exactly `allowed_dups` duplicates passes.
    mostly_dups = (float(num_rows) - float(allowed_dups)) / float(num_rows) if num_rows else 1.0
    max_missing = f"{vcfg.max_missing_coordinates:.2%}"

    def rows(key: str, type_: str, column: str, kwargs: dict[str, Any], description: str) -> Check:
        return Check(key, "rows", f"ExpectColumnValues{type_}", column, kwargs, description)

    checks = [rows("label_range", "ToBeBetween", "label", {"min_value": 0, "max_value": num_classes - 1},
                   f"labels in [0, {num_classes})")]
    if vcfg.require_all_classes:
        least = max(1, vcfg.min_class_count)
        checks.append(Check("class_counts", "classes", "ExpectColumnValuesToBeBetween", "count", {"min_value": least},
                            f"every one of the {num_classes} classes has >= {least} images"))
    checks += [
        rows("id_unique", "ToBeUnique", "id", {}, "ids unique"),
        rows("ra_range", "ToBeBetween", "ra", {"min_value": 0, "max_value": 360, "strict_max": True},
             "ra in [0, 360) where present"),
        rows("dec_range", "ToBeBetween", "dec", {"min_value": -90, "max_value": 90}, "dec in [-90, 90] where present"),
        rows("ra_present", "ToNotBeNull", "ra", {"mostly": mostly_coords}, f"at most {max_missing} rows without ra"),
        rows("dec_present", "ToNotBeNull", "dec", {"mostly": mostly_coords}, f"at most {max_missing} rows without dec"),
        rows("redshift_nonnegative", "ToBeBetween", "redshift", {"min_value": 0}, "redshift >= 0 where present"),
    ]
    height, width, channels = declared_shape(cfg)
    for column, value in (("height", height), ("width", width), ("channels", channels)):
        if value is not None:
            checks.append(rows(f"image_{column}", "ToBeInSet", column, {"value_set": [value]}, f"{column} {value}"))
    dtype = declared_dtype(cfg)
    checks += [
        rows("image_dtype", "ToBeInSet", "dtype", {"value_set": [dtype]}, f"image dtype {dtype}"),
        rows("image_not_constant", "ToBeInSet", "is_constant", {"value_set": [False]}, "no blank (constant) images"),
        rows("image_no_nan", "ToBeBetween", "nan_count", {"min_value": 0, "max_value": 0}, "no NaN pixels"),
        rows("image_duplicates", "ToBeInSet", "is_duplicate", {"value_set": [False], "mostly": mostly_dups},
             f"at most {vcfg.max_duplicate_images} exact duplicate images"),
    ]
    return checks


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Import and run GE without its logs and warnings: the stage's output is a progress bar and a verdict.

    The package logger is raised to ERROR before the import (its modules log while registering), and
    every ``great_expectations.*`` logger after it, since some modules pin their own level at INFO.
    """
    package = logging.getLogger("great_expectations")
    saved = {package: package.level}
    package.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import great_expectations  # noqa: F401  (its loggers exist once it is imported)

            for name in list(logging.root.manager.loggerDict):
                if name.split(".")[0] == "great_expectations":
                    logger = logging.getLogger(name)
                    saved.setdefault(logger, logger.level)
                    logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def run_checks(checks: list[Check], tables: dict[str, pd.DataFrame], examples: int) -> dict[str, Any]:
    """Validate each table with its checks in one ephemeral GE context; returns GE results by check key."""
    with _quiet():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        # GE draws its own tqdm bar per validation unless told not to.
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas("astroflow")
        # SUMMARY with partial_unexpected_count = examples: GE cuts the index list to the first `examples`.
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": examples}
        results: dict[str, Any] = {}
        for table, frame in tables.items():
            table_checks = [c for c in checks if c.table == table]
            if not table_checks:
                continue
            batch_def = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
            batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
            suite = gx.ExpectationSuite(
                name=f"astroflow-{table}",
                expectations=[
                    getattr(gx.expectations, c.type)(column=c.column, meta={"check": c.key}, **c.kwargs)
                    for c in table_checks
                ],
            )
            outcome = batch.validate(suite, result_format=result_format)
            for res in outcome.results:
                results[res.expectation_config.meta["check"]] = res
    return results


def _snake(name: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")


def _entry(check: Check, res: Any, tables: dict[str, pd.DataFrame], examples: int) -> dict[str, Any]:
    result = dict(res.result or {})
    rows = [int(i) for i in (result.get("partial_unexpected_index_list") or [])][:examples]
    entry: dict[str, Any] = {
        "check": check.key,
        "name": _snake(check.type),
        "table": check.table,
        "column": check.column,
        "kwargs": check.kwargs,
        "description": check.description,
        "success": bool(res.success),
        "element_count": int(result.get("element_count") or 0),
        # Rows with no value, which GE leaves out of range checks and of unexpected_percent.
        "missing_count": int(result.get("missing_count") or 0),
        "unexpected_count": int(result.get("unexpected_count") or 0),
        "unexpected_percent": float(result.get("unexpected_percent") or 0.0),
        "examples": rows,
    }
    if check.table == "classes":
        classes = tables["classes"]
        entry["example_classes"] = [
            {"index": i, "name": str(classes.at[i, "name"]), "count": int(classes.at[i, "count"])} for i in rows
        ]
    if check.key == "image_duplicates":
        entry["example_duplicate_of"] = {str(i): int(tables["rows"].at[i, "duplicate_of"]) for i in rows}
    error = _exception_message(res.exception_info)
    if error is not None:
        entry["success"] = False
        entry["error"] = error
    return entry


def _exception_message(info: Any) -> str | None:
    """GE reports an exception either at the top level or keyed by the metric that raised it."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    nested = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return "; ".join(dict.fromkeys(str(v.get("exception_message")) for v in nested)) or None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _call_text(entry: dict[str, Any]) -> str:
    """``expect_x(column, k=v)`` with floats shortened (``mostly`` carries a tiny slack)."""
    args = [entry["column"]] + [
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["kwargs"].items()
    ]
    return f"{entry['name']}({', '.join(args)})"


def _failure_line(entry: dict[str, Any]) -> str:
    head = f"{entry['check']}: {_call_text(entry)}"
    if "error" in entry:
        return f"{head}: raised {entry['error']}"
    unit = "classes" if entry["table"] == "classes" else "rows"
    considered = entry["element_count"] - entry["missing_count"]
    with_value = f" with a value, {entry['missing_count']} missing" if entry["missing_count"] else ""
    counts = (
        f"{entry['unexpected_count']} of {considered} {unit} unexpected "
        f"({entry['unexpected_percent']:.2f}%{with_value})"
    )
    if entry["table"] == "classes":
        shown = ", ".join(f"{c['index']} {c['name']!r} ({c['count']} images)" for c in entry["example_classes"])
        return f"{head}: {counts}; e.g. classes {shown}"
    if "example_duplicate_of" in entry:
        shown = ", ".join(f"{r} (= row {d})" for r, d in entry["example_duplicate_of"].items())
        return f"{head}: {counts}; e.g. rows {shown}"
    return f"{head}: {counts}; e.g. rows {entry['examples']}"


def render_summary(report: dict[str, Any]) -> str:
    """Short markdown for people: verdict, one line per expectation, class counts, missing coordinates."""
    status = "PASSED" if report["success"] else "FAILED"
    lines = [
        f"# Validation {status}",
        "",
        f"{report['num_rows']} images {tuple(report['image_shape'])} {report['image_dtype']}, "
        f"data hash `{report['data_hash']}`.",
        "",
        "| | check | expectation | column | unexpected | examples |",
        "|---|---|---|---|---|---|",
    ]
    for e in report["expectations"]:
        mark = "✓" if e["success"] else "✗"
        if "error" in e:
            unexpected = "error: " + " ".join(e["error"].split()).replace("|", "/")
        else:
            unexpected = f"{e['unexpected_count']} ({e['unexpected_percent']:.2f}%)"
        shown = ", ".join(str(i) for i in e["examples"])
        lines.append(f"| {mark} | {e['check']} | {e['name']} | {e['column']} | {unexpected} | {shown} |")
    lines += ["", "## Classes", "", "| class | name | images |", "|---|---|---|"]
    for i, (name, count) in enumerate(report["class_counts"].items()):
        lines.append(f"| {i} | {name} | {count} |")
    missing = report["missing_coordinates"]
    lines += [
        "",
        "## Coordinates and duplicates",
        "",
        f"- rows without ra: {missing['ra']}, without dec: {missing['dec']}, without either: {missing['any']} "
        f"({missing['fraction']:.2%}; limit {report['limits']['max_missing_coordinates']:.2%})",
        f"- exact duplicate images: {report['duplicate_images']} (limit {report['limits']['max_duplicate_images']})",
        "",
    ]
    return "\n".join(lines)


def validate(cfg: Config, prepared_path: Path, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Stage entry point shared by the CLI, DVC and the flows: scan, check, write the report, pass or raise."""
    prepared_path = Path(prepared_path)
    out_dir = Path(out_dir)
    vcfg = cfg.validate_
    prepared = PreparedDataset(prepared_path)
    if prepared.num_images == 0:
        raise DataError(f"{prepared_path}: the prepared dataset holds no images")
    class_names = list(cfg.data.class_names)
    if prepared.class_names != class_names:
        raise DataError(
            f"{prepared_path}: prepared with class names {prepared.class_names} but data.class_names is "
            f"{class_names}; run `astroflow prepare` again"
        )
    checks = build_checks(cfg, prepared.num_images)

    t0 = time.perf_counter()
    rows = scan(prepared, cfg.data.chunk_size, progress=progress)
    t1 = time.perf_counter()
    labels = rows["label"].to_numpy()
    in_range = (labels >= 0) & (labels < len(class_names))
    counts = np.bincount(labels[in_range], minlength=len(class_names)).astype(np.int64)
    classes = pd.DataFrame({"name": class_names, "count": counts})
    tables = {"rows": rows, "classes": classes}
    results = run_checks(checks, tables, vcfg.examples)
    t2 = time.perf_counter()
    log.debug("scan %.2fs (%d images hashed), great-expectations %.2fs", t1 - t0, rows.attrs["hashed_images"], t2 - t1)

    entries = [_entry(c, results[c.key], tables, vcfg.examples) for c in checks]
    report = _report(cfg, prepared, tables, entries, labels_out_of_range=int((~in_range).sum()))
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_FILE
    atomic_write_json(report_path, report)
    atomic_write_text(out_dir / SUMMARY_FILE, render_summary(report))
    if not report["success"]:
        failed = [e for e in entries if not e["success"]]
        lines = "\n".join(f"  - {_failure_line(e)}" for e in failed)
        raise ValidationFailed(
            f"{prepared_path}: {len(failed)} of {len(entries)} expectations failed (report: {report_path}):\n{lines}",
            summary_markdown=render_summary(report),
        )
    return report


def _report(
    cfg: Config,
    prepared: PreparedDataset,
    tables: dict[str, pd.DataFrame],
    entries: list[dict[str, Any]],
    *,
    labels_out_of_range: int,
) -> dict[str, Any]:
    """``report.json``: the verdict, what was checked, the per-expectation entries and the counts behind them."""
    vcfg = cfg.validate_
    rows, classes = tables["rows"], tables["classes"]
    missing_ra = int(rows["ra"].isna().sum())
    missing_dec = int(rows["dec"].isna().sum())
    missing_any = int((rows["ra"].isna() | rows["dec"].isna()).sum())
    return {
        "success": all(e["success"] for e in entries),
        "prepared": str(prepared.path),
        "num_rows": int(len(rows)),
        "data_hash": prepared.data_hash,
        "image_shape": list(prepared.image_shape),
        "image_dtype": str(rows["dtype"].iat[0]),
        "class_counts": {name: int(c) for name, c in zip(classes["name"], classes["count"])},
        "labels_out_of_range": labels_out_of_range,
        "missing_coordinates": {
            "ra": missing_ra,
            "dec": missing_dec,
            "any": missing_any,
            "fraction": missing_any / len(rows),
        },
        "duplicate_images": int(rows["is_duplicate"].sum()),
        "constant_images": int(rows["is_constant"].sum()),
        "nan_images": int((rows["nan_count"] > 0).sum()),
        "limits": {
            "max_missing_coordinates": vcfg.max_missing_coordinates,
            "max_duplicate_images": vcfg.max_duplicate_images,
            "min_class_count": vcfg.min_class_count,
            "require_all_classes": vcfg.require_all_classes,
        },
        "expectations": entries,
    }


def run_stage(run: StageRun) -> dict[str, Any]:
    """The ``validate`` stage: check ``prepare``'s dataset; the summary keeps the report's headline fields."""
    from pipeline.data.prepare import DATASET_FILE

    report = validate(run.cfg, run.inputs["prepare"] / DATASET_FILE, run.out, progress=run.progress)
    return {k: report[k] for k in ("success", "num_rows", "data_hash", "class_counts", "duplicate_images")}


def summary_line(summary: dict[str, Any]) -> str:
    return f"validation passed on {summary['num_rows']} rows"

"""``astroflow catalog export``: one catalog file astronomers open directly (FITS, VOTable, ECSV, Parquet, CSV).

The catalog itself is a partitioned Parquet dataset (``docs/catalog.md``); TOPCAT, astropy's
``Table.read`` and most survey tools want one file with units, column descriptions and the provenance
in its header. Every format is written from the same astropy :class:`~astropy.table.Table` (Parquet
from the Arrow table itself, so pandas and pyarrow read native types), atomically:

- units: ``deg`` on ``ra``/``dec`` (with the ICRS UCDs in VOTable); descriptions of every column
  (FITS ``TCOMMn``, VOTable ``DESCRIPTION``, ECSV header, Parquet field metadata);
- table metadata: class names, model id(s), temperature(s), TTA, code version, run id(s), catalog;
- ``run_ts`` is FITS-safe: an astropy ``Time`` (UTC) in FITS and ECSV, ISO 8601 text in VOTable and
  CSV, a UTC timestamp in Parquet; null ``ra``/``dec``/``source_row`` are masked (FITS: NaN, ``TNULL``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from astropy.table import MaskedColumn, Table
from astropy.time import Time

from pipeline.catalog.parquet import PARTITION, PREDICTIONS, UNITS, Catalog, column_description, predictions_dataset
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_path

FORMATS = ("fits", "votable", "ecsv", "parquet", "csv")
UCDS = {"id": "meta.id;meta.main", "ra": "pos.eq.ra;meta.main", "dec": "pos.eq.dec;meta.main", "run_ts": "time.epoch"}
FITS_KEYS = {
    "class_names": ("CLASSES", "class names in label order (JSON list)"),
    "model_id": ("MODEL_ID", "astroflow model id(s)"),
    "temperature": ("TEMPERAT", "calibration temperature(s) applied"),
    "tta": ("TTA", "TTA over the model's training symmetry"),
    "code_version": ("CODEVER", "astroflow version (git commit)"),
    "run": ("RUN_ID", "prediction run id(s)"),
    "catalog": ("CATALOG", "what this table is"),
    "exported_at": ("DATE", "export time (UTC)"),
}


def export_catalog(root: str | Path, output: str | Path, fmt: str, *, run: str | None = None, force: bool = False) -> dict[str, Any]:
    """Write the complete runs of catalog ``root`` (or run ``run`` only) to ``output`` in ``fmt``.

    Refuses to replace an existing ``output`` unless ``force``; returns what was written.
    """
    root, output = Path(root), Path(output)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if output.exists() and not force:
        raise DataError(f"{output}: already exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise DataError(f"{output.parent}: output directory not found")
    catalog = Catalog(root)
    table = _rows(catalog, run)
    meta = table_meta(catalog, table)
    with atomic_path(output) as tmp:
        WRITERS[fmt](table, tmp, meta)
    return {"output": str(output), "format": fmt, "rows": table.num_rows, "runs": meta["run"].split(",") if meta["run"] else []}


def _rows(catalog: Catalog, run: str | None) -> pa.Table:
    """The visible (complete) rows, in run then input order, with the ``run`` column."""
    if not (catalog.root / PREDICTIONS).is_dir():
        raise DataError(f"{catalog.root}: no complete prediction run to export (is it a catalog root? default: schedule.catalog)")
    dataset = predictions_dataset(catalog.root)
    table = dataset.to_table(filter=(pads.field(PARTITION) == run) if run is not None else None)
    if run is not None and not table.num_rows:
        runs = sorted(set(dataset.to_table(columns=[PARTITION]).column(PARTITION).to_pylist()))
        raise DataError(f"--run {run}: no complete run of that id in {catalog.root}; complete runs: {', '.join(runs) or 'none'}")
    return table.sort_by([(PARTITION, "ascending"), ("source_file", "ascending"), ("source_row", "ascending")])


def _joined(table: pa.Table, column: str) -> str:
    return ",".join(str(v) for v in sorted(set(table.column(column).to_pylist()), key=str))


def code_version() -> str:
    """``astroflow <version>`` plus the git commit of the code, when known (what the registry records)."""
    from pipeline.score.registry import code_version as versions

    v = versions()
    commit = v.get("git_commit")
    dirty = "+dirty" if v.get("git_dirty") else ""
    return f"astroflow {v.get('astroflow', 'unknown')}" + (f" ({commit[:12]}{dirty})" if commit else "")


def table_meta(catalog: Catalog, table: pa.Table) -> dict[str, Any]:
    """Provenance of the exported rows; several runs give comma-separated ids and temperatures."""
    temps = sorted(set(table.column("temperature").to_pylist()))
    tta = sorted(set(table.column("tta").to_pylist()))
    return {
        "catalog": "astroflow galaxy-morphology predictions",
        "class_names": catalog.class_names() or [],
        "model_id": _joined(table, "model_id"),
        "temperature": temps[0] if len(temps) == 1 else ",".join(map(str, temps)),
        "tta": tta[0] if len(tta) == 1 else "mixed",
        "code_version": code_version(),
        "run": _joined(table, PARTITION),
        "exported_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),  # UTC, the form FITS DATE wants
    }


def to_astropy(table: pa.Table, meta: dict[str, Any], *, time_as_text: bool = False) -> Table:
    """An astropy Table of ``table``: nulls masked, units and descriptions set, ``run_ts`` a UTC ``Time`` (or ISO text)."""
    class_names = meta["class_names"]
    out = Table(meta=dict(meta))
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            times = Time(col.cast(pa.timestamp("us")).to_numpy().astype("datetime64[us]"), scale="utc", format="datetime64")
            out[name] = times.isot if time_as_text else times
        elif pa.types.is_string(col.type):
            out[name] = np.array(col.fill_null("").to_pylist(), dtype=str)
        else:
            mask = col.is_null().to_numpy(zero_copy_only=False)
            values = col.fill_null(False if pa.types.is_boolean(col.type) else 0).to_numpy(zero_copy_only=False)
            out[name] = MaskedColumn(values, mask=mask) if mask.any() else values
        out[name].info.description = column_description(name, class_names)
        if name in UNITS:
            out[name].info.unit = UNITS[name]
    return out


def _write_fits(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    """astropy's FITS table (its serialized column descriptions, a FITS time column), plus the header cards
    other readers (TOPCAT) use: ``TCOMMn`` descriptions, ``TUCDn`` and the provenance keywords."""
    from astropy.io import fits

    columns = to_astropy(table, meta)
    columns.meta.clear()  # written below as FITS keywords (a list is no header value)
    columns.write(path, format="fits", overwrite=True)
    with fits.open(path, mode="update", checksum=True) as hdul:
        hdu = hdul[1]
        hdu.name = "PREDICTIONS"
        for i, name in enumerate(table.column_names, 1):
            hdu.header[f"TCOMM{i}"] = column_description(name, meta["class_names"])
            if name in UCDS:
                hdu.header[f"TUCD{i}"] = UCDS[name]
        for key, (card, comment) in FITS_KEYS.items():
            hdu.header[card] = json.dumps(meta[key]) if isinstance(meta[key], list) else meta[key]
            hdu.header.add_comment(f"{card}: {comment}")  # a comment on the card itself would cut long values


def _write_votable(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    from astropy.io.votable import from_table
    from astropy.io.votable.tree import Info

    votable = from_table(to_astropy(table, meta, time_as_text=True))
    vt = votable.get_first_table()
    vt.name = "predictions"
    vt.description = f"{meta['catalog']}: model {meta['model_id']}, run {meta['run']}"
    for name, ucd in UCDS.items():
        vt.get_field_by_id(name).ucd = ucd
    for key, value in meta.items():
        vt.infos.append(Info(name=key, value=json.dumps(value) if isinstance(value, list) else str(value)))
    votable.to_xml(str(path))


def _write_parquet(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    """The Arrow table itself (native types; its fields carry the catalog's descriptions and units), plus the meta
    as JSON and as astropy's Parquet reader expects it (units, descriptions, meta, string widths)."""
    from astropy.table import meta as astropy_meta

    header = to_astropy(table.slice(0, 0), meta, time_as_text=True)
    yaml = "\n".join(astropy_meta.get_yaml_from_table(header))
    schema_meta = {f"astroflow.{k}": json.dumps(v) for k, v in meta.items()}
    schema_meta["table_meta_yaml"] = yaml
    for name in table.column_names:
        if pa.types.is_string(table.schema.field(name).type):  # astropy's string widths, else it warns and guesses
            schema_meta[f"table::len::{name}"] = str(pc.max(pc.utf8_length(table.column(name))).as_py() or 1)
    pq.write_table(table.replace_schema_metadata(schema_meta), path, compression="zstd")


def _write_ecsv(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    to_astropy(table, meta).write(path, format="ascii.ecsv", overwrite=True)


def _write_csv(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    to_astropy(table, meta, time_as_text=True).write(path, format="ascii.csv", overwrite=True)


WRITERS: dict[str, Callable[[pa.Table, Path, dict[str, Any]], None]] = {
    "fits": _write_fits,
    "votable": _write_votable,
    "ecsv": _write_ecsv,
    "parquet": _write_parquet,
    "csv": _write_csv,
}

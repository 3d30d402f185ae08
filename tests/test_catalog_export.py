"""``astroflow catalog export``: one file per format that astropy (and TOPCAT) open with units, column
descriptions and provenance; the catalog's own Parquet fields carry the descriptions too."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.io.votable import parse
from astropy.table import Table
from astropy.time import Time

from pipeline.catalog import parquet as C
from pipeline.catalog.predict import predict
from pipeline.cli import main
from pipeline.config import GALAXY10_CLASS_NAMES, load_config
from test_predict import images, make_checkpoint, write_h5

REPO = Path(__file__).resolve().parents[1]
N_A, N_B = 20, 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir whose nightly catalog (``schedule.catalog``: ``catalog/``) holds two complete runs; run A has
    ra 360 and -1 and dec 91 in its input, which predict stores as null."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "best.pt", seed=0)
    cfg = load_config(None, ["predict.device=cpu", "predict.workers=0", "predict.batch_size=8", "predict.chunk_size=8"])
    src_a = write_h5(root / "a.h5", images(N_A, seed=1), ids=[f"a{i}" for i in range(N_A)])
    import h5py

    with h5py.File(src_a, "a") as f:
        f["ra"][1], f["ra"][2], f["dec"][4] = 360.0, -1.0, 91.0
    src_b = write_h5(root / "b.h5", images(N_B, seed=2), ids=[f"b{i}" for i in range(N_B)])
    runs = [predict(cfg, ckpt, src, root / "catalog", progress=False)["run_id"] for src in (src_a, src_b)]
    (root / "runs.json").write_text(json.dumps(runs))
    return root


def runs(work: Path) -> list[str]:
    return json.loads((work / "runs.json").read_text())


def export(work: Path, fmt: str, out: Path, *extra: str) -> int:
    return main(["catalog", "export", "--workdir", str(work), "--format", fmt, "--output", str(out), "-q", *extra])


def test_the_catalog_parquet_fields_carry_descriptions_and_units(work: Path) -> None:
    part = next((work / "catalog" / C.PREDICTIONS).rglob("*.parquet"))
    schema = pq.read_schema(part)
    assert schema.field("ra").metadata == {b"description": C.DESCRIPTIONS["ra"].encode(), b"unit": b"deg"}
    assert all(f.metadata and f.metadata[b"description"] for f in schema)
    assert b"Edge-on with Bulge" in schema.field("prob_edge_on_with_bulge").metadata[b"description"]


def test_fits_from_the_cli_reads_back_with_units_descriptions_and_metadata(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.fits"
    cmd = [sys.executable, "-m", "pipeline.cli", "catalog", "export", "--workdir", str(work), "--format", "fits", "--output", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"exported {N_A + N_B} rows of 2 run(s)" in done.stderr
    with fits.open(out, checksum=True) as hdul:
        hdul.verify("exception")
        header = hdul["PREDICTIONS"].header
        cols = hdul["PREDICTIONS"].columns.names
        assert header[f"TUNIT{cols.index('ra') + 1}"] == "deg" and header[f"TUNIT{cols.index('dec') + 1}"] == "deg"
        assert header[f"TCOMM{cols.index('entropy') + 1}"] == C.DESCRIPTIONS["entropy"]
        assert json.loads(header["CLASSES"]) == list(GALAXY10_CLASS_NAMES)
        assert header["RUN_ID"] == ",".join(sorted(runs(work))) and header["MODEL_ID"].startswith("astroformer_pico-")
        assert header["TEMPERAT"] == 1.0 and header["TTA"] is False and header["CODEVER"].startswith("astroflow ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Table.read(out, astropy_native=True)
    assert len(t) == N_A + N_B and t["ra"].unit == "deg" and t["ra"].description == C.DESCRIPTIONS["ra"]
    assert isinstance(t["run_ts"], Time) and t["run_ts"].scale == "utc"
    a = t[np.char.startswith(t["id"].astype(str), "a")]
    a.sort("source_row")
    assert list(a["ra"].mask[:5]) == [False, True, True, False, False] and bool(a["dec"].mask[4])
    assert Table.read(out)["id"].dtype.kind in "US"  # the plain read works too


def test_votable_passes_verification_with_units_descriptions_and_infos(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.xml"
    assert export(work, "votable", out) == 0
    t = Table.read(out, format="votable", verify="exception")
    assert len(t) == N_A + N_B and t["dec"].unit == "deg" and t["max_prob"].description == C.DESCRIPTIONS["max_prob"]
    Time(list(t["run_ts"]), format="isot", scale="utc")  # ISO 8601 text
    table = parse(str(out), verify="exception").get_first_table()
    infos = {i.name: i.value for i in table.infos}
    assert json.loads(infos["class_names"]) == list(GALAXY10_CLASS_NAMES) and infos["run"] == ",".join(sorted(runs(work)))
    assert {"model_id", "temperature", "tta", "code_version"} <= set(infos)
    assert table.get_field_by_id("ra").ucd == "pos.eq.ra;meta.main"


def test_parquet_reads_in_pandas_pyarrow_and_astropy(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.parquet"
    assert export(work, "parquet", out) == 0
    df = pd.read_parquet(out)
    assert len(df) == N_A + N_B and str(df["run_ts"].dtype) == "datetime64[us, UTC]" and df["ra"].isna().sum() == 2
    schema = pq.read_schema(out)
    assert schema.field("dec").metadata[b"unit"] == b"deg" and schema.field("run").metadata[b"description"]
    assert json.loads(schema.metadata[b"astroflow.class_names"]) == list(GALAXY10_CLASS_NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Table.read(out)
    assert t["ra"].unit == "deg" and t["pred_class"].description == C.DESCRIPTIONS["pred_class"]
    assert t.meta["class_names"] == list(GALAXY10_CLASS_NAMES) and t.meta["run"] == ",".join(sorted(runs(work)))


@pytest.mark.parametrize("fmt", ["ecsv", "csv"])
def test_text_formats_read_back(work: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"cat.{fmt}"
    assert export(work, fmt, out, "--run", runs(work)[1]) == 0
    t = Table.read(out, format="ascii.ecsv" if fmt == "ecsv" else "ascii.csv")
    assert len(t) == N_B and set(t["run"]) == {runs(work)[1]}
    if fmt == "ecsv":
        assert t["ra"].unit == "deg" and isinstance(t["run_ts"], Time) and t.meta["model_id"].startswith("astroformer_pico-")


def test_an_existing_output_needs_force(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat.fits"
    out.write_text("keep me")
    assert export(work, "fits", out) == 2
    assert f"{out}: already exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert export(work, "fits", out, "--force") == 0 and len(Table.read(out)) == N_A + N_B


def test_an_unknown_run_or_catalog_is_a_user_error(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export(work, "csv", tmp_path / "x.csv", "--run", "rnope") == 2
    err = capsys.readouterr().err
    assert "--run rnope" in err and runs(work)[0] in err
    assert export(work, "csv", tmp_path / "y.csv", "--catalog", str(tmp_path / "none")) == 2
    assert "no complete prediction run" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob(".*.tmp"))

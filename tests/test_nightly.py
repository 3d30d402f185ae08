"""The nightly catalog as a library and a CLI command, without Prefect: inbox scanning, the catalog lock,
per-input failure semantics, and ``astroflow nightly`` writing only under ``schedule.catalog``.

The production model is a random-weights astroformer_pico at 32 px placed in a registry directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.catalog import nightly
from pipeline.catalog.parquet import read_predictions
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.layout import Layout
from conftest import install_production_model, make_galaxy10_h5

PARAMS = {
    "predict": {"workers": 0, "batch_size": 16, "chunk_size": 16, "device": "cpu"},
    "schedule": {"inbox_settle_s": 0, "lock_timeout_s": 5},
}


# ------------------------------------------------------------------ inbox and lock


def test_inbox_scan_skips_partial_and_processed_entries(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_galaxy10_h5(inbox / "a.h5", n=5)
    make_galaxy10_h5(inbox / "b.h5", n=5)
    (inbox / "c.h5.part").write_bytes(b"uploading")
    (inbox / ".hidden.h5").write_bytes(b"x")
    (inbox / "notes.txt").write_text("not an input")
    new, skipped = nightly.scan_inbox(inbox, {}, settle_s=0)
    assert [e.name for e in new] == ["a.h5", "b.h5"]
    assert [s["input"] for s in skipped] == ["notes.txt"]
    processed = {new[0].key: {}}
    assert [e.name for e in nightly.scan_inbox(inbox, processed, settle_s=0)[0]] == ["b.h5"]
    new_soon, skipped_soon = nightly.scan_inbox(inbox, {}, settle_s=3600)
    assert not new_soon and {s["input"] for s in skipped_soon} == {"a.h5", "b.h5", "notes.txt"}
    make_galaxy10_h5(inbox / "a.h5", n=6)  # a replaced file is a new input
    assert "a.h5" in [e.name for e in nightly.scan_inbox(inbox, processed, settle_s=0)[0]]


def test_a_directory_input_changes_identity_when_any_file_does(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = inbox / "cutouts"
    folder.mkdir(parents=True)
    (folder / "g1.png").write_bytes(b"\x89PNG one")
    before = nightly.inbox_entry(folder, inbox)
    assert before.identity["kind"] == "dir" and before.identity["files"] == 1
    assert nightly.inbox_entry(folder, inbox).key == before.key  # stable without changes
    (folder / "g2.png").write_bytes(b"\x89PNG two")
    assert nightly.inbox_entry(folder, inbox).key != before.key


def test_a_held_catalog_lock_makes_another_run_give_up(tmp_path: Path) -> None:
    with nightly.catalog_lock(tmp_path / "cat", timeout_s=0):
        with pytest.raises(nightly.NightlyBusy, match="held the lock"):
            with nightly.catalog_lock(tmp_path / "cat", timeout_s=0.2):
                pass
    with nightly.catalog_lock(tmp_path / "cat", timeout_s=0):  # released on exit
        pass


def test_state_round_trips_and_starts_empty(tmp_path: Path) -> None:
    assert nightly.load_state(tmp_path) == {"version": 1, "inputs": {}}
    nightly.save_state(tmp_path, {"version": 1, "inputs": {"k": {"name": "a.h5"}}})
    assert nightly.load_state(tmp_path)["inputs"] == {"k": {"name": "a.h5"}}


def test_run_inline_keeps_the_exception_for_result() -> None:
    def boom() -> None:
        raise RuntimeError("chunk lost")

    assert nightly.run_inline(lambda x: x + 1, 1, name="ok").result() == 2
    with pytest.raises(RuntimeError, match="chunk lost"):
        nightly.run_inline(boom, name="boom").result()


# ------------------------------------------------------------------ runs with a production model


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return tmp_path


def _inbox(workdir: Path, sizes: dict[str, int], name: str = "inbox") -> Path:
    inbox = workdir / name
    inbox.mkdir(parents=True, exist_ok=True)
    for i, (fname, n) in enumerate(sizes.items()):
        make_galaxy10_h5(inbox / fname, n=n, size=32, seed=100 + i)
    return inbox


def _cli(workdir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
    """``astroflow nightly`` in-process: (exit status, the JSON summary it printed; {} if none)."""
    capsys.readouterr()
    try:
        rc = main(["nightly", "--workdir", str(workdir), "-q", *extra])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else {})


def test_cli_classifies_the_inbox_into_the_nightly_catalog_only(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mid = install_production_model(workdir / "registry")
    _inbox(workdir, {"a.h5": 20, "b.h5": 12})
    rc, summary = _cli(workdir, capsys)
    assert rc == 0, summary
    catalog = workdir / "catalog"  # schedule.catalog's default, relative to the workdir
    assert summary["catalog"] == str(catalog) and summary["model_id"] == mid
    df = read_predictions(catalog)
    assert len(df) == 32 == summary["rows_written"] == summary["catalog_rows"]
    assert sorted(Path(p).name for p in df["source_file"].unique()) == ["a.h5", "b.h5"]
    assert not (workdir / "data").exists()  # the DVC predict stage's data/catalog is never touched
    assert len(nightly.load_state(catalog)["inputs"]) == 2

    rc, again = _cli(workdir, capsys)
    assert rc == 0 and again["new_inputs"] == 0 and again["rows_written"] == 0
    assert len(read_predictions(catalog)) == 32


def test_cli_options_override_inbox_and_catalog(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install_production_model(workdir / "registry")
    _inbox(workdir, {"a.h5": 5}, name="elsewhere")
    rc, summary = _cli(workdir, capsys, "--inbox", str(workdir / "elsewhere"), "--catalog", str(workdir / "night"))
    assert rc == 0 and summary["new_inputs"] == 1
    assert len(read_predictions(workdir / "night")) == 5 and not (workdir / "catalog").exists()


def test_cli_without_a_production_model_is_a_user_error(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _inbox(workdir, {"a.h5": 5})
    capsys.readouterr()
    assert main(["nightly", "--workdir", str(workdir), "-q"]) == 2
    out, err = capsys.readouterr()
    assert not out and "no production model" in err
    assert not (workdir / "catalog").exists()


def test_cli_exits_3_on_a_failed_input_and_a_rerun_completes_it(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install_production_model(workdir / "registry")
    inbox = _inbox(workdir, {"good.h5": 12})
    (inbox / "broken.h5").write_bytes(b"not an hdf5 file at all")
    rc, summary = _cli(workdir, capsys)
    assert rc == 3
    assert [r["input"] for r in summary["failed"]] == ["broken.h5"]
    assert [r["input"] for r in summary["classified"]] == ["good.h5"]
    assert len(nightly.load_state(workdir / "catalog")["inputs"]) == 1

    make_galaxy10_h5(inbox / "broken.h5", n=9, size=32, seed=5)  # the upload is repaired
    rc, summary = _cli(workdir, capsys)
    assert rc == 0 and [r["input"] for r in summary["classified"]] == ["broken.h5"]
    df = read_predictions(workdir / "catalog")
    assert len(df) == 21 and not df.duplicated(["source_file", "source_row"]).any()


def test_a_failed_chunk_keeps_the_input_unrecorded_and_a_rerun_redoes_only_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, chunk_1_fails: None
) -> None:
    install_production_model(workdir / "registry")
    _inbox(workdir, {"big.h5": 40})  # chunks of 16: rows 0-15, 16-31, 32-39
    cfg, layout = load_config(workdir / "params.yaml"), Layout(workdir)
    with nightly.local_executor(workers=2) as submit:
        summary = nightly.run_nightly(cfg, layout, submit)
    assert [(r["input"], r["error"].split(":")[0]) for r in summary["failed"]] == [("big.h5", "chunk 1")]
    assert not summary["classified"] and not nightly.load_state(layout.resolve(cfg.schedule.catalog))["inputs"]
    assert read_predictions(workdir / "catalog").empty  # an unfinished run's rows are not visible ...
    (staged,) = (workdir / "catalog" / "runs").glob("*/predictions")  # ... they wait in the run's directory
    assert sorted(pq.read_table(staged)["source_row"].to_pylist()) == [*range(16), *range(32, 40)]

    monkeypatch.undo()  # the worker is back
    summary = nightly.run_nightly(cfg, layout)
    (row,) = summary["classified"]
    assert (row["status"], row["num_written"], row["num_skipped_chunks"], row["num_predicted"]) == ("complete", 16, 2, 40)
    assert sorted(read_predictions(workdir / "catalog")["source_row"]) == list(range(40))

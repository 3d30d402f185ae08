"""The validate stage: a clean dataset passes, and each defect fails exactly the expectation meant for it."""

from __future__ import annotations

import json
import logging
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.data import validate as validate_module
from pipeline.config import Config, config_from_dict
from pipeline.errors import DataError, ValidationFailed
from pipeline.data.prepare import PreparedDataset, write_prepared
from pipeline.data.sources.arrays import ArraySource
from pipeline.data.scan import ChunkFingerprint, DuplicateFinder
from pipeline.data.validate import REPORT_FILE, SUMMARY_FILE, Check, validate

N = 60
SIZE = 16
NUM_CLASSES = 10


@dataclass
class Data:
    """A clean dataset in memory; tests break one thing, then write it as a prepared file."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    coords: dict[str, np.ndarray] = field(default_factory=dict)


def clean_data(n: int = N, dtype: str = "uint8", seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, SIZE, SIZE, 3)).astype(dtype)
    return Data(
        images=images,
        labels=np.arange(n) % NUM_CLASSES,
        ids=[f"gal{i:04d}" for i in range(n)],
        coords={
            "ra": rng.uniform(0, 360, n),
            "dec": rng.uniform(-90, 90, n),
            "redshift": rng.uniform(0, 0.3, n),
            "pxscale": np.full(n, 0.262),
        },
    )


def make_config(**validate_overrides: object) -> Config:
    # A small chunk size so that duplicates and examples span several chunks.
    return config_from_dict(
        {"data": {"chunk_size": 8}, "validate": {"image_shape": [SIZE, SIZE, 3], **validate_overrides}}
    )


def write(data: Data, path: Path, cfg: Config) -> Path:
    write_prepared(ArraySource(data.images, data.labels, data.ids, **data.coords), path, cfg.data, progress=False)
    return path


def run(tmp_path: Path, data: Data, cfg: Config) -> tuple[dict, ValidationFailed | None]:
    """Validate; return the report on disk and the failure (None if it passed)."""
    prepared = write(data, tmp_path / "dataset.h5", cfg)
    out = tmp_path / "validation"
    error = None
    try:
        returned = validate(cfg, prepared, out, progress=False)
    except ValidationFailed as exc:
        error = exc
    assert (out / SUMMARY_FILE).is_file()
    report = json.loads((out / REPORT_FILE).read_text())
    if error is None:
        assert returned == report
    return report, error


def entry(report: dict, check: str) -> dict:
    (found,) = [e for e in report["expectations"] if e["check"] == check]
    return found


def assert_fails_for(
    report: dict, error: ValidationFailed | None, failing: dict[str, list[int]], examples: int = 5
) -> None:
    """Exactly the checks in ``failing`` fail, each with the unexpected rows given (all of them)."""
    assert error is not None, "validation passed but should have failed"
    assert report["success"] is False
    failed = {e["check"] for e in report["expectations"] if not e["success"]}
    assert failed == set(failing)
    message = str(error)
    assert REPORT_FILE in message
    for check, rows in failing.items():
        e = entry(report, check)
        shown = sorted(rows)[:examples]
        considered = e["element_count"] - e["missing_count"]
        assert e["unexpected_count"] == len(rows)
        assert e["examples"] == shown
        assert e["unexpected_percent"] == pytest.approx(100 * len(rows) / considered)
        assert check in message and e["name"] in message
        assert f"{len(rows)} of {considered}" in message
        if e["table"] == "classes":
            assert all(f"{i} {report_class_name(report, i)!r}" in message for i in shown)
        elif check == "image_duplicates":
            assert all(f"{r} (= row {e['example_duplicate_of'][str(r)]})" in message for r in shown)
        else:
            assert f"rows {shown}" in message


def report_class_name(report: dict, index: int) -> str:
    return list(report["class_counts"])[index]


# --- passing ---------------------------------------------------------------------------------------


def test_clean_dataset_passes_and_writes_both_files(tmp_path: Path) -> None:
    data = clean_data()
    report, error = run(tmp_path, data, make_config())
    assert error is None
    assert report["success"] is True
    assert all(e["success"] and e["unexpected_count"] == 0 for e in report["expectations"])
    assert report["num_rows"] == N
    expected_counts = np.bincount(data.labels, minlength=NUM_CLASSES)
    assert list(report["class_counts"].values()) == expected_counts.tolist()
    assert report["missing_coordinates"] == {"ra": 0, "dec": 0, "any": 0, "fraction": 0.0}
    assert report["duplicate_images"] == 0
    summary = (tmp_path / "validation" / SUMMARY_FILE).read_text()
    assert "PASSED" in summary and "✗" not in summary
    assert summary.count("✓") == len(report["expectations"])


def test_expected_checks_are_present(tmp_path: Path) -> None:
    report, _ = run(tmp_path, clean_data(), make_config())
    checks = {e["check"] for e in report["expectations"]}
    assert checks == {
        "label_range", "class_counts", "id_unique", "ra_range", "dec_range", "ra_present", "dec_present",
        "redshift_nonnegative", "image_height", "image_width", "image_channels", "image_dtype",
        "image_not_constant", "image_no_nan", "image_duplicates",
    }


def test_stage_is_quiet_without_progress(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config()
    prepared = write(clean_data(), tmp_path / "dataset.h5", cfg)
    capfd.readouterr()
    caplog.set_level(logging.INFO)  # as a CLI that shows INFO logs would
    validate(cfg, prepared, tmp_path / "validation", progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert [r.getMessage() for r in caplog.records if r.name.startswith("great_expectations")] == []


# --- labels and classes ----------------------------------------------------------------------------


def test_label_out_of_range(tmp_path: Path) -> None:
    # prepare refuses such labels, so corrupt the written file the way a foreign tool could.
    cfg = make_config()
    prepared = write(clean_data(), tmp_path / "dataset.h5", cfg)
    bad = {13: NUM_CLASSES, 41: NUM_CLASSES + 5}
    with h5py.File(prepared, "r+") as h5:
        for row, label in bad.items():
            h5["ans"][row] = label
    with pytest.raises(ValidationFailed) as info:
        validate(cfg, prepared, tmp_path / "validation", progress=False)
    report = json.loads((tmp_path / "validation" / REPORT_FILE).read_text())
    assert_fails_for(report, info.value, {"label_range": sorted(bad)})
    assert report["labels_out_of_range"] == len(bad)


@pytest.mark.parametrize("min_class_count", [0, 1])
def test_missing_class(tmp_path: Path, min_class_count: int) -> None:
    data = clean_data()
    missing = 3
    data.labels = np.where(data.labels == missing, missing + 1, data.labels)
    report, error = run(tmp_path, data, make_config(min_class_count=min_class_count))
    assert_fails_for(report, error, {"class_counts": [missing]})
    e = entry(report, "class_counts")
    assert e["table"] == "classes"
    assert e["example_classes"] == [{"index": missing, "name": Config().data.class_names[missing], "count": 0}]
    assert report["class_counts"][Config().data.class_names[missing]] == 0


def test_class_below_min_count(tmp_path: Path) -> None:
    data = clean_data()
    per_class = N // NUM_CLASSES
    thin = 5
    data.labels[np.flatnonzero(data.labels == thin)[0]] = thin + 1
    report, error = run(tmp_path, data, make_config(min_class_count=per_class))
    assert_fails_for(report, error, {"class_counts": [thin]})
    assert entry(report, "class_counts")["example_classes"][0]["count"] == per_class - 1


def test_missing_class_allowed_when_not_required(tmp_path: Path) -> None:
    data = clean_data()
    data.labels = np.where(data.labels == 3, 4, data.labels)
    report, error = run(tmp_path, data, make_config(require_all_classes=False))
    assert error is None
    assert "class_counts" not in {e["check"] for e in report["expectations"]}


def test_class_names_differing_from_the_prepared_file_is_a_data_error(tmp_path: Path) -> None:
    cfg = make_config()
    prepared = write(clean_data(), tmp_path / "dataset.h5", cfg)
    other = make_config()
    other.data.class_names = [f"c{i}" for i in range(NUM_CLASSES)]
    with pytest.raises(DataError, match="class names"):
        validate(other, prepared, tmp_path / "validation", progress=False)


# --- ids and coordinates ---------------------------------------------------------------------------


def test_duplicate_ids(tmp_path: Path) -> None:
    data = clean_data()
    data.ids[17] = data.ids[2]
    data.ids[33] = data.ids[2]
    report, error = run(tmp_path, data, make_config())
    # GE flags every row holding a repeated id, the first occurrence included.
    assert_fails_for(report, error, {"id_unique": [2, 17, 33]})


@pytest.mark.parametrize("bad_values", [[360.0, -1.0], [400.0, -0.001]])
def test_ra_out_of_range(tmp_path: Path, bad_values: list[float]) -> None:
    data = clean_data()
    rows = [4, 29]
    data.coords["ra"][rows] = bad_values
    data.coords["ra"][7] = 0.0  # the lower bound is allowed
    report, error = run(tmp_path, data, make_config())
    assert_fails_for(report, error, {"ra_range": rows})


def test_dec_out_of_range(tmp_path: Path) -> None:
    data = clean_data()
    rows = [5, 6, 50]
    data.coords["dec"][rows] = [90.5, -91.0, 180.0]
    data.coords["dec"][[8, 9]] = [90.0, -90.0]  # both bounds are allowed
    report, error = run(tmp_path, data, make_config())
    assert_fails_for(report, error, {"dec_range": rows})


def test_negative_redshift(tmp_path: Path) -> None:
    data = clean_data()
    rows = [8, 44]
    data.coords["redshift"][rows] = [-0.1, -1e-6]
    data.coords["redshift"][[1, 2]] = np.nan  # missing is fine
    report, error = run(tmp_path, data, make_config())
    assert_fails_for(report, error, {"redshift_nonnegative": rows})


def test_missing_coordinates_within_limit_pass_and_are_counted(tmp_path: Path) -> None:
    data = clean_data()
    limit = 0.1
    both = [0, 11, 22, 33, 44]
    dec_only = 55
    assert len(both) + 1 <= limit * N
    data.coords["ra"][both] = np.nan
    data.coords["dec"][both + [dec_only]] = np.nan
    report, error = run(tmp_path, data, make_config(max_missing_coordinates=limit))
    assert error is None
    assert report["missing_coordinates"] == {
        "ra": len(both),
        "dec": len(both) + 1,
        "any": len(both) + 1,
        "fraction": (len(both) + 1) / N,
    }
    assert entry(report, "ra_present")["unexpected_count"] == len(both)
    assert entry(report, "dec_present")["examples"] == (both + [dec_only])[:5]


def test_missing_coordinates_exactly_at_limit_pass(tmp_path: Path) -> None:
    # 20/30 >= 1 - 10/30 is False in floats: the limit must still pass.
    n = 30
    rows = list(range(0, n, 3))
    data = clean_data(n=n)
    data.coords["ra"][rows] = np.nan
    data.coords["dec"][rows] = np.nan
    report, error = run(tmp_path, data, make_config(max_missing_coordinates=len(rows) / n))
    assert error is None, str(error)
    assert report["missing_coordinates"]["any"] == len(rows)


def test_too_many_missing_coordinates(tmp_path: Path) -> None:
    data = clean_data()
    limit = 0.1
    rows = list(range(3, N, 8))  # 8 rows: more than 10% of 60
    assert len(rows) > limit * N
    data.coords["ra"][rows] = np.nan
    data.coords["dec"][rows] = np.nan
    report, error = run(tmp_path, data, make_config(max_missing_coordinates=limit))
    assert_fails_for(report, error, {"ra_present": rows, "dec_present": rows})
    assert report["missing_coordinates"]["any"] == len(rows)


def test_all_coordinates_missing_pass_by_default(tmp_path: Path) -> None:
    data = clean_data()
    data.coords = {}
    report, error = run(tmp_path, data, make_config())
    assert error is None
    assert report["missing_coordinates"]["any"] == N


# --- images ----------------------------------------------------------------------------------------


def test_float_images_fail_the_declared_dtype(tmp_path: Path) -> None:
    data = clean_data(dtype="float32")
    report, error = run(tmp_path, data, make_config())
    assert_fails_for(report, error, {"image_dtype": list(range(N))})
    assert report["image_dtype"] == "float32"


def test_nan_images(tmp_path: Path) -> None:
    data = clean_data(dtype="float32")
    rows = [3, 10, 47]
    data.images[3, 0, 0, 0] = np.nan
    data.images[10, 5, 7, 2] = np.nan
    data.images[47] = np.nan  # all NaN: a NaN image, not a blank one
    report, error = run(tmp_path, data, make_config(image_dtype="float32"))
    assert_fails_for(report, error, {"image_no_nan": rows})
    assert report["nan_images"] == len(rows)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_constant_images(tmp_path: Path, dtype: str) -> None:
    data = clean_data(dtype=dtype)
    rows = [2, 9, 58]
    for value, row in zip((0, 128, 255), rows):  # distinct values: blank, not duplicates
        data.images[row] = value
    if dtype == "uint16":
        data.images[9] = 0x0102  # bytes differ within a pixel, values do not
    if dtype == "float32":
        data.images[2, : SIZE // 2] = -0.0  # equal to 0.0 by value
    report, error = run(tmp_path, data, make_config(image_dtype=dtype))
    assert_fails_for(report, error, {"image_not_constant": rows})
    assert report["constant_images"] == len(rows)


def test_nearly_constant_image_passes(tmp_path: Path) -> None:
    data = clean_data()
    data.images[4] = 7
    data.images[4, SIZE - 1, SIZE - 1, 2] = 8  # one pixel differs, in the last byte
    report, error = run(tmp_path, data, make_config())
    assert error is None
    assert report["constant_images"] == 0


def test_wrong_declared_shape(tmp_path: Path) -> None:
    report, error = run(tmp_path, clean_data(), make_config(image_shape=[2 * SIZE, SIZE, 3]))
    assert_fails_for(report, error, {"image_height": list(range(N))})


def test_default_shape_rule_for_synthetic_source(tmp_path: Path) -> None:
    cfg = config_from_dict({"data": {"chunk_size": 8, "synthetic": {"image_size": 2 * SIZE}}})
    report, error = run(tmp_path, clean_data(), cfg)
    assert_fails_for(report, error, {"image_height": list(range(N)), "image_width": list(range(N))})


def test_default_shape_rule_for_other_sources_checks_only_channels(tmp_path: Path) -> None:
    cfg = config_from_dict({"data": {"source": "h5", "path": "unused.h5", "chunk_size": 8}})
    data = clean_data()
    rgb_report, rgb_error = run(tmp_path / "rgb", data, cfg)
    assert rgb_error is None and "image_channels" in {e["check"] for e in rgb_report["expectations"]}
    data.images = np.concatenate([data.images, data.images[..., :1]], axis=-1)
    report, error = run(tmp_path / "rgba", data, cfg)
    assert_fails_for(report, error, {"image_channels": list(range(N))})
    assert "image_height" not in {e["check"] for e in report["expectations"]}


# --- duplicates ------------------------------------------------------------------------------------


def with_duplicates() -> tuple[Data, dict[int, int]]:
    """Rows 5 and 12 copy row 1 (same chunk and later chunks), row 40 copies row 3."""
    data = clean_data()
    copies = {5: 1, 12: 1, 40: 3}
    for row, original in copies.items():
        data.images[row] = data.images[original]
    return data, copies


def test_duplicate_images_above_limit(tmp_path: Path) -> None:
    data, copies = with_duplicates()
    report, error = run(tmp_path, data, make_config(max_duplicate_images=len(copies) - 1))
    assert_fails_for(report, error, {"image_duplicates": sorted(copies)})
    e = entry(report, "image_duplicates")
    assert e["example_duplicate_of"] == {str(r): o for r, o in sorted(copies.items())}
    assert f"{min(copies)} (= row {copies[min(copies)]})" in str(error)


def test_duplicate_images_within_limit_pass_and_are_counted(tmp_path: Path) -> None:
    data, copies = with_duplicates()
    report, error = run(tmp_path, data, make_config(max_duplicate_images=len(copies)))
    assert error is None
    assert report["duplicate_images"] == len(copies)
    assert entry(report, "image_duplicates")["unexpected_count"] == len(copies)


def test_default_allows_no_duplicate(tmp_path: Path) -> None:
    data = clean_data()
    data.images[N - 1] = data.images[0]
    report, error = run(tmp_path, data, make_config())
    assert_fails_for(report, error, {"image_duplicates": [N - 1]})


def test_duplicate_finder_survives_fingerprint_collisions() -> None:
    # Swapping two words keeps the word sum and xor: same fingerprint, different content.
    words = np.arange(1, 9, dtype=np.uint64)
    a = words.view(np.uint8)
    b = words[[1, 0, *range(2, 8)]].copy().view(np.uint8)
    chunk1 = np.stack([a, b])
    chunk2 = np.stack([b.copy(), a.copy(), a.copy()])
    fp1, fp2 = ChunkFingerprint.of(chunk1), ChunkFingerprint.of(chunk2)
    assert fp1.keys()[0] == fp1.keys()[1]
    rows = {0: a, 1: b}
    finder = DuplicateFinder(lambda i: rows[i])
    assert finder.add(0, chunk1, fp1).tolist() == [-1, -1]
    assert finder.add(2, chunk2, fp2).tolist() == [1, 0, 0]


def test_constant_rows_of_multibyte_words() -> None:
    # Two words of 2**63 sum to 0 (mod 2**64) and xor to 0: a blank row's signature, not a blank row.
    mimic = np.zeros(4, dtype=np.uint64)
    mimic[[1, 3]] = 2**63
    flat = np.stack(
        [
            np.full(32, 9, dtype=np.uint8),
            np.tile(np.array([1, 2, 3, 4], dtype=np.uint8), 8),  # a 4-byte pixel repeated: not constant
            np.zeros(32, dtype=np.uint8),
            mimic.view(np.uint8),
        ]
    )
    fingerprint = ChunkFingerprint.of(flat)
    assert fingerprint.keys()[3] == fingerprint.keys()[2]
    assert fingerprint.constant_rows(flat).tolist() == [True, False, True, False]
    as_uint32 = flat.view(np.uint32)  # as 4-byte values, the repeated pixel is one value repeated
    assert ChunkFingerprint.of(flat).constant_rows(as_uint32).tolist() == [True, True, True, False]


# --- streaming ----------------------------------------------------------------------------------------


def test_scan_holds_one_chunk_of_images_not_the_file(tmp_path: Path) -> None:
    n, side = 600, 64
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    cfg = make_config()
    prepared = tmp_path / "dataset.h5"
    write_prepared(ArraySource(images, np.arange(n) % NUM_CLASSES), prepared, cfg.data, progress=False)
    dataset = PreparedDataset(prepared)
    validate_module.scan(dataset, cfg.data.chunk_size, progress=False)  # lazy imports out of the count
    tracemalloc.start()
    try:
        frame = validate_module.scan(dataset, cfg.data.chunk_size, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frame) == n and not frame["is_duplicate"].any()
    assert peak < images.nbytes / 4


# --- message and report ----------------------------------------------------------------------------


def test_failure_message_names_every_failed_expectation(tmp_path: Path) -> None:
    data = clean_data()
    data.coords["ra"][11] = 360.0
    data.coords["redshift"][12] = -1.0
    data.images[13] = 0
    report, error = run(tmp_path, data, make_config())
    assert_fails_for(report, error, {"ra_range": [11], "redshift_nonnegative": [12], "image_not_constant": [13]})
    message = str(error)
    assert "3 of" in message.splitlines()[0]
    assert str(tmp_path / "validation" / REPORT_FILE) in message
    summary = (tmp_path / "validation" / SUMMARY_FILE).read_text()
    assert "FAILED" in summary and summary.count("✗") == 3


def test_an_expectation_that_raises_fails_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = validate_module.build_checks

    def with_broken_check(cfg: Config, num_rows: int) -> list[Check]:
        broken = Check("broken", "rows", "ExpectColumnValuesToBeBetween", "no_such_column", {"min_value": 0}, "x")
        return [*original(cfg, num_rows), broken]

    monkeypatch.setattr(validate_module, "build_checks", with_broken_check)
    report, error = run(tmp_path, clean_data(), make_config())
    assert error is not None and "broken" in str(error)
    broken = entry(report, "broken")
    assert broken["success"] is False and "no_such_column" in broken["error"]
    assert all(e["success"] for e in report["expectations"] if e["check"] != "broken")


def test_examples_are_capped(tmp_path: Path) -> None:
    data = clean_data()
    rows = list(range(0, 40, 4))
    data.coords["redshift"][rows] = -1.0
    report, error = run(tmp_path, data, make_config(examples=3))
    assert_fails_for(report, error, {"redshift_nonnegative": rows}, examples=3)

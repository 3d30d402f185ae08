"""The synthetic Galaxy10-like source: reproducible, schema-exact, and actually learnable."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.h5 import field
from pipeline.data.sources import synthetic
from pipeline.data.sources.synthetic import (
    CLASS_NAMES,
    GALAXY10_COUNTS,
    draw_labels,
    generate_arrays,
    preview_grid,
    render_galaxy,
    write_synthetic_h5,
)

FIELDS = ("images", "label", "ra", "dec", "redshift", "pxscale")


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in FIELDS)


def test_same_seed_gives_identical_bytes() -> None:
    assert _same(generate_arrays(8, size=64, seed=3), generate_arrays(8, size=64, seed=3))


def test_different_seed_gives_different_data() -> None:
    a, b = generate_arrays(8, size=64, seed=3), generate_arrays(8, size=64, seed=4)
    assert a["images"].tobytes() != b["images"].tobytes()
    assert not np.array_equal(a["ra"], b["ra"])


@pytest.mark.parametrize("size", [64, 256])
def test_chunked_generation_equals_one_shot(size: int) -> None:
    whole = generate_arrays(7, size=size, seed=11)
    parts = [generate_arrays(m, size=size, seed=11, start=lo) for lo, m in ((0, 3), (3, 1), (4, 3))]
    joined = {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}
    assert _same(whole, joined)


def test_labels_drawn_without_rendering_match_generated_rows() -> None:
    assert np.array_equal(draw_labels(12, seed=5, start=30), generate_arrays(12, size=32, seed=5, start=30)["label"])


def test_generated_arrays_have_galaxy10_types_and_ranges() -> None:
    d = generate_arrays(20, size=48, seed=1)
    assert d["images"].shape == (20, 48, 48, 3) and d["images"].dtype == np.uint8
    assert d["label"].shape == (20,) and d["label"].dtype == np.uint8 and d["label"].max() < len(GALAXY10_COUNTS)
    for name in ("ra", "dec", "redshift", "pxscale"):
        assert d[name].shape == (20,) and d[name].dtype == np.float64 and np.isfinite(d[name]).all()
    assert ((d["ra"] >= 0) & (d["ra"] < 360)).all()
    assert ((d["dec"] >= -90) & (d["dec"] <= 90)).all()
    assert (d["redshift"] >= 0).all()
    assert np.allclose(d["pxscale"], synthetic.PXSCALE * 256 / 48)
    assert np.allclose(generate_arrays(1, size=256)["pxscale"], 0.262)


def test_h5_file_has_exact_galaxy10_schema(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "synthetic.h5"
    out = write_synthetic_h5(path, 23, size=64, seed=2, chunk=10, progress=False)
    assert out == path and path.is_file()
    assert list(tmp_path.rglob("*.tmp")) == []
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"images", "ans", "ra", "dec", "redshift", "pxscale"}  # Galaxy10's names
        images = f["images"]
        assert images.shape == (23, 64, 64, 3) and images.dtype == np.uint8
        assert images.chunks == (1, 64, 64, 3)
        assert images.compression == "gzip" and images.compression_opts == 1
        assert f["ans"].shape == (23,) and f["ans"].dtype == np.uint8
        for name in ("ra", "dec", "redshift", "pxscale"):
            assert f[name].shape == (23,) and f[name].dtype == np.float64
        stored = {k: f[field(k)][()] for k in FIELDS}
    assert _same(stored, generate_arrays(23, size=64, seed=2))
    assert ((stored["ra"] >= 0) & (stored["ra"] < 360)).all()
    assert ((stored["dec"] >= -90) & (stored["dec"] <= 90)).all()
    assert (stored["redshift"] >= 0).all() and (stored["label"] < 10).all()


def test_failed_write_leaves_no_file_and_no_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synthetic.generate_arrays

    def flaky(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_arrays", flaky)
    path = tmp_path / "g.h5"
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_h5(path, 6, size=32, chunk=3, progress=False)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_default_class_proportions_follow_galaxy10_counts() -> None:
    n = 6000
    freq = np.bincount(draw_labels(n, seed=0), minlength=10) / n
    expected = np.asarray(GALAXY10_COUNTS) / sum(GALAXY10_COUNTS)
    # binomial sd <= 0.0065 at n=6000: 0.02 is > 3 sd for every class
    assert np.abs(freq - expected).max() < 0.02, (freq, expected)


def test_custom_class_weights_are_respected() -> None:
    weights = [1, 0, 0, 0, 3, 0, 0, 0, 0, 0]
    labels = draw_labels(2000, seed=9, class_weights=weights)
    assert set(np.unique(labels)) == {0, 4}
    assert abs((labels == 4).mean() - 0.75) < 0.04


@pytest.mark.parametrize("weights", [[1.0] * 9, [1.0] * 9 + [-1.0], [0.0] * 10, [float("nan")] + [1.0] * 9])
def test_bad_class_weights_are_rejected(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="class_weights"):
        generate_arrays(1, size=32, class_weights=weights)


def test_bad_label_is_rejected() -> None:
    with pytest.raises(ValueError, match="label"):
        render_galaxy(10, np.random.default_rng(0), 64)


def test_every_class_renders_a_finite_centred_galaxy() -> None:
    """No NaN/inf anywhere in the float pipeline, and real structure (not a blank frame)."""
    for label in range(len(CLASS_NAMES)):
        for j in range(4):
            with np.errstate(invalid="raise", divide="raise", over="raise"):
                img = render_galaxy(label, np.random.default_rng([21, label, j]), 128)
            assert img.shape == (128, 128, 3) and img.dtype == np.uint8
            lum = img.astype(np.float64).mean(axis=2)
            assert lum.std() > 2.0, (label, j)
            centre = np.percentile(lum[48:80, 48:80], 95)
            border = np.median(np.concatenate([lum[:16].ravel(), lum[-16:].ravel()]))
            assert centre > border + 10.0, (label, j, centre, border)


def test_preview_grid_writes_png(tmp_path: Path) -> None:
    path = preview_grid(tmp_path / "grid.png", n_per_class=1, size=32)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(block(3, 16, 2), block(16, 32, 2), block(32, 64, 2), block(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.slow
def test_tiny_cnn_learns_the_classes_well_above_chance() -> None:
    """The data set must carry learnable morphology: a tiny CNN, a few CPU epochs, held-out rows.

    Fails if images do not depend on the label (accuracy would sit near the 0.15 majority rate).
    """
    n_train, n_test, epochs, batch = 2000, 500, 5, 64
    d = generate_arrays(n_train + n_test, size=64, seed=0)
    x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(d["label"].astype(np.int64))
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and immune to oversubscription on a busy 2-core box
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        net = _tiny_cnn()
        opt = torch.optim.AdamW(net.parameters(), lr=6e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=6e-3, total_steps=epochs * -(-n_train // batch))
        start = time.perf_counter()
        for _ in range(epochs):
            net.train()
            order = torch.randperm(n_train, generator=gen)
            for lo in range(0, n_train, batch):
                idx = order[lo : lo + batch]
                xb = torch.rot90(x_train[idx], int(torch.randint(0, 4, (1,), generator=gen)), (2, 3))
                if torch.rand(1, generator=gen).item() < 0.5:
                    xb = xb.flip(3)
                loss = nn.functional.cross_entropy(net(xb), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x_test).argmax(1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    majority = np.bincount(y_test.numpy(), minlength=10).max() / n_test
    print(f"tiny CNN test accuracy {acc:.3f} (majority {majority:.3f}, train {time.perf_counter() - start:.1f}s)")
    assert acc > 0.45, acc

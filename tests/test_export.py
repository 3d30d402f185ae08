"""ONNX export and the onnx predict backend: a dynamic batch, and the same classes as PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.catalog import parquet as C
from pipeline.learn.checkpoint import load_model, model_id
from pipeline.config import GALAXY10_CLASS_NAMES, load_config
from pipeline.errors import CheckpointError
from pipeline.score.export import INPUT_NAME, export_onnx, onnx_metadata
from pipeline.catalog.predict import predict
from test_predict import PROBS, SIZE, check_catalog, images, make_checkpoint, write_h5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", seed=0)
    return ckpt, export_onnx(ckpt, ckpt.with_suffix(".onnx"))


def test_export_has_a_dynamic_batch_and_matches_torch(exported: tuple[Path, Path]) -> None:
    ckpt, path = exported
    meta = onnx_metadata(path)
    assert meta["astroflow.model_id"] == model_id(ckpt)
    assert meta["astroflow.class_names"] and int(meta["astroflow.img_size"]) == SIZE
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.name == INPUT_NAME and graph_input.type.tensor_type.shape.dim[0].dim_param
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model, _, _ = load_model(ckpt)
    for batch in (1, 6, 33):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
        assert got.shape == (batch, len(GALAXY10_CLASS_NAMES))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_export_refuses_a_broken_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        export_onnx(tmp_path / "bad.pt", tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_onnx_backend_gives_the_torch_classes(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    ckpt, path = exported
    src = write_h5(tmp_path / "in.h5", images(40, seed=21, size=40), ids=[f"o{i}" for i in range(40)])
    cfg = load_config(None, ["predict.device=cpu", "predict.workers=0", "predict.batch_size=16", "predict.chunk_size=24"])
    torch_run = predict(cfg, ckpt, src, tmp_path / "torch", progress=False)
    cfg.predict.backend = "onnx"
    onnx_run = predict(cfg, ckpt, src, tmp_path / "onnx", progress=False)
    assert not any("exported" in n for n in onnx_run["notes"])  # used the export beside the checkpoint
    a = check_catalog(tmp_path / "torch", torch_run["run_id"]).set_index("id").sort_index()
    b = check_catalog(tmp_path / "onnx", onnx_run["run_id"]).set_index("id").sort_index()
    assert list(a.index) == list(b.index) and (a["model_id"] == b["model_id"]).all()
    assert (a["pred_label"] == b["pred_label"]).all()
    np.testing.assert_allclose(b[PROBS].to_numpy(), a[PROBS].to_numpy(), atol=1e-4)


def test_onnx_backend_exports_when_no_matching_file(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    ckpt, path = exported
    lone = tmp_path / "lone" / "best.pt"
    lone.parent.mkdir()
    shutil.copy(ckpt, lone)
    stale = onnx.load(str(path))  # an export of another model beside the checkpoint: must not be used
    next(p for p in stale.metadata_props if p.key == "astroflow.model_id").value = "some-other-model"
    onnx.save(stale, str(lone.with_suffix(".onnx")))
    src = write_h5(tmp_path / "in.h5", images(6, seed=22))
    cfg = load_config(None, ["predict.device=cpu", "predict.workers=0", "predict.backend=onnx"])
    s = predict(cfg, lone, src, tmp_path / "cat", progress=False)
    fresh = tmp_path / "cat" / "models" / f"{model_id(lone)}.onnx"
    assert fresh.is_file() and onnx_metadata(fresh)["astroflow.model_id"] == s["model_id"] == model_id(lone)
    assert any("exported" in n for n in s["notes"]) and s["num_written"] == 6
    assert (C.read_predictions(tmp_path / "cat")["model_id"] == model_id(lone)).all()

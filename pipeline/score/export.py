"""Export a trained checkpoint to ONNX, for serving without PyTorch (``predict.backend: onnx``).

The graph takes the model's preprocessed input (``images``: float32 N x 3 x S x S, normalised as
``eval_transform`` does) and returns ``logits`` (N x classes); the batch dimension is dynamic. The
file's metadata names the checkpoint's model id, classes and preprocessing, so ``predict`` can tell
a stale export from the right one. Every export is checked against PyTorch on a batch of a size
other than the one traced, which also proves the batch dimension really is dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CheckpointError
from pipeline.io import atomic_write_bytes
from pipeline.score.trained_model import TrainedModel

INPUT_NAME, OUTPUT_NAME = "images", "logits"
CHECK_ATOL = 1e-3


def export_onnx(model: TrainedModel | str | Path, out_path: str | Path, *, opset: int | None = None) -> Path:
    """Write ``out_path`` (atomically): the model (or the checkpoint at that path) as ONNX with a dynamic batch."""
    import onnx
    import onnxruntime as ort

    trained = model if isinstance(model, TrainedModel) else TrainedModel.load(model)
    out_path = Path(out_path)
    network = trained.network.cpu()
    size = trained.img_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step on stdout
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    meta = {
        "astroflow.model_id": trained.model_id,
        "astroflow.model_name": trained.model_name,
        "astroflow.class_names": json.dumps(trained.class_names),
        "astroflow.img_size": str(size),
        "astroflow.input_range": trained.input_range,
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))

    check = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = network(check).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: check.numpy()})[0]
    err = float(np.abs(got - expected).max())
    if got.shape != expected.shape or err > CHECK_ATOL * max(1.0, float(np.abs(expected).max())):
        raise CheckpointError(f"{trained.path}: ONNX export disagrees with PyTorch (max |diff| {err:.2e}, shape {got.shape})")
    atomic_write_bytes(out_path, data)
    return out_path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (read without loading weights into a session)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}

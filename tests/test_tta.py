"""Test-time augmentation averages exactly the symmetry group the model was trained with."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from conftest import GAP_MODEL, make_checkpoint
from pipeline.score.trained_model import TrainedModel, scores


class LinearBackend:
    """A fixed linear map of the flattened pixels: not invariant under any rotation or flip."""

    def __init__(self, pixels: int, classes: int = 3) -> None:
        self.weight = torch.randn(pixels, classes, generator=torch.Generator().manual_seed(0))

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


def view_mean(backend: LinearBackend, x: torch.Tensor, flips: tuple[bool, ...]) -> torch.Tensor:
    """Log of the mean probability over the quarter turns of ``x`` (and of its mirror, if ``flips`` has True)."""
    views = [torch.rot90(torch.flip(x, (-1,)) if f else x, k, (-2, -1)) for f in flips for k in range(4)]
    probs = torch.stack([backend.logits(v).softmax(dim=1) for v in views]).mean(dim=0)
    return probs.log()


def model(tmp_path: Path, rotation: str, hflip: bool) -> TrainedModel:
    overrides = [f"train.rotation={rotation}", f"train.hflip={str(hflip).lower()}"]
    return TrainedModel.load(make_checkpoint(tmp_path / f"{rotation}-{hflip}.pt", GAP_MODEL, img_size=16, overrides=overrides))


@pytest.fixture
def batch() -> tuple[LinearBackend, torch.Tensor]:
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return LinearBackend(3 * 8 * 8), x


def test_rot90_without_flip_averages_the_4_rotations_only(tmp_path: Path, batch: tuple[LinearBackend, torch.Tensor]) -> None:
    backend, x = batch
    m = model(tmp_path, "rot90", False)
    got = scores(backend, x, tta=m.tta_views(True))
    assert m.num_views(True) == 4
    assert torch.allclose(got, view_mean(backend, x, (False,)), atol=1e-5)
    assert not torch.allclose(got, view_mean(backend, x, (False, True)), atol=1e-3)


@pytest.mark.parametrize("rotation, hflip", [("d4", False), ("rot90", True), ("any", True)])
def test_d4_or_a_flip_averages_the_8_views(tmp_path: Path, batch: tuple[LinearBackend, torch.Tensor], rotation: str, hflip: bool) -> None:
    backend, x = batch
    m = model(tmp_path, rotation, hflip)
    assert m.num_views(True) == 8
    assert torch.allclose(scores(backend, x, tta=m.tta_views(True)), view_mean(backend, x, (False, True)), atol=1e-5)


def test_no_rotation_flip_only_or_a_logged_no_op(
    tmp_path: Path, batch: tuple[LinearBackend, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    backend, x = batch
    mirror = model(tmp_path, "none", True).tta_views(True)
    expected = torch.logsumexp(torch.stack([backend.logits(v).log_softmax(1) for v in (x, torch.flip(x, (-1,)))]), 0) - math.log(2)
    assert torch.allclose(scores(backend, x, tta=mirror), expected, atol=1e-5)
    with caplog.at_level(logging.WARNING):
        plain = model(tmp_path, "none", False).tta_views(True)
    assert len(plain) == 1 and "no-op" in caplog.text
    assert torch.allclose(scores(backend, x, tta=plain).softmax(1), backend.logits(x).softmax(1), atol=1e-6)

"""Shared test fixtures: small generated inputs in the Galaxy10 schema (tests never use real survey data)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pytest
import yaml

if TYPE_CHECKING:
    from pipeline.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def make_galaxy10_h5(
    path: Path,
    n: int = 60,
    *,
    size: int = 16,
    num_classes: int = 10,
    seed: int = 0,
    with_coords: bool = True,
    compression: str | None = None,
) -> dict[str, np.ndarray]:
    """Write a small file with exactly the Galaxy10 DECals schema; every class present; distinct images."""
    rng = np.random.default_rng(seed)
    data = {
        "images": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
        "ans": (np.arange(n) % num_classes).astype(np.uint8),
    }
    if with_coords:
        data["ra"] = rng.uniform(0, 360, n)
        data["dec"] = rng.uniform(-90, 90, n)
        data["redshift"] = rng.uniform(0, 0.3, n)
        data["pxscale"] = np.full(n, 0.262)
    with h5py.File(path, "w") as h5:
        for key, value in data.items():
            if key == "images":
                h5.create_dataset(key, data=value, chunks=(1, size, size, 3), compression=compression)
            else:
                h5.create_dataset(key, data=value)
    return data


@pytest.fixture
def galaxy10_h5(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "g10.h5"
    return path, make_galaxy10_h5(path)


def h5_overrides(path: Path, size: int = 16) -> list[str]:
    return [
        "data.source=h5",
        f"data.path={path}",
        f"validate.image_shape=[{size},{size},3]",
        "shard.max_samples_per_shard=20",
    ]


def install_production_model(registry_root: Path, *, seed: int = 0, img_size: int = 32) -> str:
    """A random-weights astroformer_pico checkpoint as the registry's production model; returns its id.

    Written with the registry's on-disk layout (``candidates/<id>/model.pt``, ``production`` symlink), not
    its promotion API, so tests that only need *a* production model do not depend on the promotion rule.
    """
    import torch

    from models.factory import create_model
    from pipeline.score import registry as reg
    from pipeline.learn.checkpoint import model_id, save_checkpoint
    from pipeline.config import GALAXY10_CLASS_NAMES, Config

    torch.manual_seed(seed)
    net = create_model("astroformer_pico", num_classes=len(GALAXY10_CLASS_NAMES), img_size=img_size)
    cfg = Config()
    cfg.model.name, cfg.model.img_size = "astroformer_pico", img_size
    staged = registry_root / f".staged-{seed}.pt"
    registry_root.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        staged,
        {"model": net.state_dict(), "config": cfg.to_dict(), "class_names": list(GALAXY10_CLASS_NAMES),
         "model_name": "astroformer_pico", "img_size": img_size, "epoch": 0, "metrics": {}},
    )
    mid = model_id(staged)
    target = registry_root / reg.CANDIDATES / mid
    target.mkdir(parents=True, exist_ok=True)
    staged.replace(target / reg.MODEL_FILE)
    link = registry_root / reg.PRODUCTION
    link.unlink(missing_ok=True)
    link.symlink_to(Path(reg.CANDIDATES) / mid)
    return mid


# ---------------------------------------------------------------- tiny shards and checkpoints for evaluate/registry

GAP_MODEL = "astroflow_test_gap_linear"
SHARD_SIZE = 32
RED_STEP = 20
RED_NOISE = 12
EVAL_OVERRIDES = [
    "shard.workers=1",
    "shard.max_samples_per_shard=7",
    "split.train=0.6",
    "split.val=0.2",
    "split.test=0.2",
    "evaluate.workers=0",
    "evaluate.device=cpu",
    "evaluate.batch_size=8",
    "calibrate.bins=5",
]


def register_gap_model() -> None:
    """A timm model ``GAP_MODEL``: global average pooling then a linear layer, rotation- and flip-invariant."""
    import timm
    import torch
    from timm.models import register_model

    if timm.is_model(GAP_MODEL):
        return

    class GapLinear(torch.nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(-2, -1)))

    @register_model
    def astroflow_test_gap_linear(pretrained: bool = False, **kwargs: Any) -> GapLinear:
        return GapLinear(num_classes=kwargs.get("num_classes", 10))


def eval_cfg(*extra: str) -> Config:
    """The small-run config of the evaluate/registry tests (CPU, no workers, 7-sample shards), plus ``extra``."""
    from pipeline.config import load_config

    return load_config(None, [*EVAL_OVERRIDES, *extra])


def write_red_shards(root: Path, *extra: str, n: int = 100, seed: int = 0) -> Path:
    """``n`` noisy 32 px images whose mean red level encodes the label (noisily), sharded into ``root/shards``.

    Galaxy ids are ``gal/<i>.x``, so two such sets of different ``seed`` share ids but not data.
    """
    from pipeline.data.prepare import write_prepared
    from pipeline.data.shards import write_shards
    from pipeline.data.sources.arrays import ArraySource

    cfg = eval_cfg(*extra)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % cfg.data.num_classes
    images = rng.integers(0, 80, size=(n, SHARD_SIZE, SHARD_SIZE, 3))
    images[..., 0] += (RED_STEP * labels + rng.normal(0, RED_NOISE, n)).astype(int)[:, None, None]
    src = ArraySource(np.clip(images, 0, 255).astype(np.uint8), labels, ids=[f"gal/{i}.x" for i in range(n)])
    write_prepared(src, root / "dataset.h5", cfg.data, progress=False)
    write_shards(cfg, root / "dataset.h5", root / "shards", progress=False)
    return root / "shards"


FOUR_CLASSES = (1, 2, 7, 9)
"""Merging, Round Smooth, Unbarred Loose Spiral, Edge-on with Bulge: the Galaxy10 classes distinct at 32 px."""


def four_class_data(per_shard: int) -> list[str]:
    """Data overrides of the small training tests: :data:`FOUR_CLASSES`, 70 % train and 30 % val, in shards of
    ``per_shard`` samples."""
    from pipeline.data.sources.synthetic import CLASS_NAMES

    return [
        f"data.class_names={[CLASS_NAMES[k] for k in FOUR_CLASSES]}",
        "shard.workers=1",
        f"shard.max_samples_per_shard={per_shard}",
        "split.train=0.7",
        "split.val=0.3",
        "split.test=0.0",
    ]


def write_four_class_shards(root: Path, cfg: Config, n: int) -> Path:
    """``n`` synthetic galaxies of :data:`FOUR_CLASSES` at 32 px (labels 0-3), prepared and sharded under ``root``."""
    from pipeline.data.prepare import write_prepared
    from pipeline.data.shards import write_shards
    from pipeline.data.sources.arrays import ArraySource
    from pipeline.data.sources.synthetic import CLASS_NAMES, generate_arrays

    weights = np.zeros(len(CLASS_NAMES))
    weights[list(FOUR_CLASSES)] = 1
    d = generate_arrays(n, size=32, seed=0, class_weights=weights)
    write_prepared(ArraySource(d["images"], np.searchsorted(FOUR_CLASSES, d["label"])), root / "prepared.h5", cfg.data, progress=False)
    write_shards(cfg, root / "prepared.h5", root / "shards", progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def red_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 images of :func:`write_red_shards` in 7-sample shards, shared by a test module."""
    return write_red_shards(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Single-threaded torch for a module: tiny models gain nothing from intra-op threads, and on a busy 2-core
    machine OpenMP threads spinning against each other and the decode workers cost up to 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nearest_red_mean(model: Any, sharpness: float) -> None:
    """Make a ``GAP_MODEL`` a nearest-class-mean classifier on the red channel, ``sharpness`` times too confident.

    With class means m_c, logits k*m_c*t - k*m_c**2/2 rank classes as -(t - m_c)**2 does.
    """
    import torch

    from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = IMAGENET_MEAN[0], IMAGENET_STD[0]
    centres = torch.tensor([((40 + RED_STEP * c) / 255 - mean) / std for c in range(model.fc.out_features)])
    noise = RED_NOISE / 255 / std
    k = sharpness / noise**2
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 0] = k * centres
        model.fc.bias.copy_(-k * centres**2 / 2)


def make_checkpoint(
    path: Path,
    name: str,
    *,
    img_size: int,
    input_range: str = "imagenet",
    init: Callable[[Any], None] | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """A checkpoint of ``name`` (seed-0 weights, then ``init``) as training would write it, without training."""
    import torch

    from models.factory import create_model
    from pipeline.learn.checkpoint import save_checkpoint

    register_gap_model()
    cfg = eval_cfg(f"model.name={name}", f"model.img_size={img_size}", f"train.input_range={input_range}", *overrides)
    torch.manual_seed(0)
    model = create_model(name, num_classes=cfg.data.num_classes, img_size=img_size)
    if init is not None:
        init(model)
    payload = {
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "class_names": cfg.data.class_names,
        "model_name": name,
        "img_size": img_size,
        "epoch": 0,
        "metrics": {},
    }
    save_checkpoint(path, payload)
    return path


# ------------------------------------------------------------------ a real DVC project


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    env = {**(env or os.environ), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def ran_stages(output: str) -> list[str]:
    """The stages ``dvc repro`` ran, in order, from its output."""
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of this checkout (tracked and new files) in a fresh git + DVC repo, with a tiny demo config."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files + ["dvc.yaml", "params.yaml"]:
        src = REPO_ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synthetic"].update(num_images=160, image_size=48)
    params["model"].update(name="astroformer_pico", img_size=32)
    params["train"].update(epochs=2, batch_size=16, warmup_epochs=0, workers=0, shuffle_buffer=50)
    params["predict"].update(workers=0, batch_size=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_ok(["git", "init", "-q"], repo)
    run_ok(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run_ok(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    if not (repo / ".dvc").is_dir():
        run_ok(["dvc", "init", "-q"], repo)
    return repo


@pytest.fixture
def chunk_1_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pipeline.catalog.predict.predict`` raises for chunk 1 of a fanned-out run, as if its worker were lost."""
    from pipeline.catalog import predict as predict_mod

    real = predict_mod.predict

    def failing(*args: Any, chunks: Any = None, **kw: Any) -> dict[str, Any]:
        if chunks == [1]:
            raise RuntimeError("worker lost")
        return real(*args, chunks=chunks, **kw)

    monkeypatch.setattr(predict_mod, "predict", failing)


def evaluated_workspace(wd: Path, red_shards: Path, init: Any) -> Path:
    """A workdir as `dvc repro` leaves it (shards, best.pt, calibration.json, data/eval) for a gap model set up by ``init``."""
    from pipeline.score.calibrate import calibrate
    from pipeline.score.evaluate import evaluate

    shutil.copytree(red_shards, wd / "data" / "shards")
    ckpt = make_checkpoint(wd / "data" / "train" / "best.pt", GAP_MODEL, img_size=SHARD_SIZE, init=init)
    cal = wd / "data" / "calibration" / "calibration.json"
    calibrate(eval_cfg(), wd / "data" / "shards", ckpt, cal, progress=False)
    evaluate(eval_cfg(), wd / "data" / "shards", ckpt, wd / "data" / "eval", calibration=cal, progress=False)
    return wd

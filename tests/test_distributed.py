"""DDP helpers, and a real 2-process ``torchrun`` gloo run of the train stage on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.learn import distributed as D
from pipeline.config import dump_params, load_config
from pipeline.errors import ConfigError
from pipeline.runtime import resolve_device
from pipeline.data.prepare import write_prepared
from pipeline.data.shards import write_shards
from pipeline.data.sources.arrays import ArraySource
from pipeline.data.sources.synthetic import generate_arrays

ROOT = Path(__file__).resolve().parents[1]


def test_dist_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert D.dist_env() == D.DistInfo(0, 1, 0) and not D.dist_env().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = D.dist_env()
    assert info == D.DistInfo(3, 4, 1) and info.enabled and not info.is_main


def test_single_process_helpers_are_no_ops() -> None:
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_sum(t), torch.tensor([1.0, 2.0]))
    assert D.broadcast_flag(True, torch.device("cpu")) is True
    assert D.init_distributed(torch.device("cpu")) == (D.dist_env(), False)


def test_resolve_device_picks_the_local_rank_gpu() -> None:
    assert resolve_device("cpu", "train.device", 1) == torch.device("cpu")
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto", "train.device", 1) == expected
    if torch.cuda.is_available():
        assert resolve_device("cuda", "train.device", 1) == torch.device("cuda", 1)
        assert resolve_device("cuda:0", "train.device", 1) == torch.device("cuda", 0)  # an explicit index wins
        assert resolve_device("cuda") == torch.device("cuda")  # outside torchrun a bare cuda stays bare
    else:
        with pytest.raises(ConfigError, match="train.device"):
            resolve_device("cuda", "train.device", 1)


def test_train_command_in_process_is_the_cli_with_its_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What torchrun starts on each rank is `astroflow train --out`: bad input exits 2 with one line, no traceback."""
    from pipeline.cli import main

    assert main(["train", "--shards", str(tmp_path)]) == 2
    assert "--shards needs --out" in capsys.readouterr().err
    assert main(["train", "--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


DRIVER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from pipeline.config import load_config
    from pipeline.learn.train import train

    params, shards, out = map(Path, sys.argv[1:4])
    summary = train(load_config(params), shards, out, progress=False)
    Path(out.parent / f"rank{os.environ['RANK']}.sha256").write_text(summary["weights_sha256"])
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_gloo_agree_on_weights(tmp_path: Path) -> None:
    d = generate_arrays(120, size=32, seed=3, class_weights=[1] * 10)
    cfg = load_config(
        None,
        [
            "shard.workers=1", "shard.max_samples_per_shard=30", "split.train=0.7", "split.val=0.3", "split.test=0.0",
            "model.img_size=32", "train.batch_size=10", "train.epochs=2", "train.max_steps_per_epoch=3",
            "train.opt=adamw", "train.lr=0.003", "train.workers=1", "train.ema=true", "train.device=cpu",
            "train.deterministic=true",
        ],
    )
    write_prepared(ArraySource(d["images"], d["label"]), tmp_path / "prepared.h5", cfg.data, progress=False)
    write_shards(cfg, tmp_path / "prepared.h5", tmp_path / "shards", progress=False)
    dump_params(cfg, tmp_path / "params.yaml")
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tmp_path / "driver.py"), str(tmp_path / "params.yaml"), str(tmp_path / "shards"), str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    hashes = [(tmp_path / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 2 and metrics["weights_sha256"] == hashes[0]
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert len(history) == 3
    # every validation sample was scored once across the two ranks: top-1 is a multiple of 1/|val|
    top1 = metrics["final"]["val_top1"]
    assert np.isclose(top1 * 36, round(top1 * 36), atol=1e-4)

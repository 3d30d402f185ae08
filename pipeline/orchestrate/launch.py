"""The ``torchrun`` command for the train stage, and running it with its log streamed line by line.

One place builds the command for every caller: ``astroflow train`` (when ``train.nproc_per_node`` or
``train.nnodes`` asks for several processes), the retrain flow (which always isolates training in a
child process) and ``astroflow train --print-command`` for the other nodes of a multi-node run.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import AstroflowError, ConfigError

RDZV_ENV = "ASTROFLOW_RDZV_ENDPOINT"
LOG_TAIL_LINES = 40
REPO = Path(__file__).resolve().parents[2]


class TrainingFailed(AstroflowError):
    """torchrun exited non-zero; the message carries the tail of its log."""


def torchrun_command(cfg: Config, params: Path, shards_dir: Path, out_dir: Path, *, run_id: str, resume: bool = False) -> list[str]:
    """``python -m pipeline.cli train --out OUT`` (training in each process, see ``astroflow train --help``) under
    torchrun with the configured processes and nodes.

    One node runs standalone (a local rendezvous); several need a c10d rendezvous endpoint, taken from
    ``$ASTROFLOW_RDZV_ENDPOINT`` (host:port of node 0), and the same command started on every node.
    """
    t = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc_per_node}", f"--nnodes={t.nnodes}"]
    if t.nnodes == 1:
        cmd.append("--standalone")
    else:
        endpoint = os.environ.get(RDZV_ENV)
        if not endpoint:
            raise ConfigError(f"train.nnodes is {t.nnodes}: set ${RDZV_ENV} to host:port of the rendezvous (node 0)")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=astroflow-{run_id}"]
    cmd += ["-m", "pipeline.cli", "train", "--params", str(params), "--shards", str(shards_dir), "--out", str(out_dir), "--quiet"]
    return cmd + (["--resume"] if resume else [])


def child_env() -> dict[str, str]:
    """The environment of a launched trainer: this checkout importable, unbuffered, no progress bars."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def stream_command(cmd: list[str], log: Callable[[str], None], *, name: str = "", cwd: Path | None = None) -> None:
    """Run ``cmd``, handing each output line to ``log``; on failure raise with the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    log("running: " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=child_env(), cwd=cwd, errors="replace"
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: leave no trainers behind
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if rc != 0:
        name = name or Path(cmd[0]).name
        raise TrainingFailed(f"{name} exited with status {rc}; last {len(tail)} log lines:\n" + "\n".join(tail))

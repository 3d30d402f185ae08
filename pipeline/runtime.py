"""Where code runs: device choice and CPU naming shared by the stages and benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from pipeline.errors import ConfigError


def resolve_device(name: str, key: str = "device", local_rank: int | None = None) -> torch.device:
    """The device a config value names, for every stage.

    ``auto`` picks CUDA when present; an explicit CUDA device on a machine without one is an error naming
    ``key``. A bare ``cuda`` gets index ``local_rank`` when given: under torchrun each process of a node
    owns one GPU, so training passes its ``LOCAL_RANK`` (``pipeline.learn.distributed.dist_env``).
    """
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError as exc:
        raise ConfigError(f"{key}: {exc} (got {name!r})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def cpu_name() -> str:
    """The CPU model, for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def compute_threads(threads: int, workers: int) -> int:
    """Threads for the model: ``threads`` if set, else the cores not taken by a decode worker (at least 1).

    OpenMP threads that spin-wait for cores the decode workers hold run many times slower, so on a
    small CPU the model should not claim every core.
    """
    if threads:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - workers)

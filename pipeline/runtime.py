"""Where code runs: device choice and CPU naming shared by the stages and benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
from collections import deque
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
    return max(1, available_cores() - workers)


def available_cores() -> int:
    """Cores this process may use, shared among the processes torchrun started on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def thread_candidates(workers: int) -> tuple[int, ...]:
    """Model thread counts worth trying: every core, and the cores that decode workers leave free."""
    cores = available_cores()
    return tuple(sorted({cores, max(1, cores - workers)}, reverse=True))


def pick_threads(step_seconds: dict[int, list[float]]) -> int:
    """The thread count whose measured steps (data wait included) have the lowest median; ties go to more threads.

    Measuring beats assuming: a compute-bound model is faster with every core even beside a decode worker,
    while a model that waits for decoding, or whose threads lose cores to other processes (an OpenMP barrier
    waits for its slowest thread), measures faster with fewer.
    """
    if not step_seconds:
        raise ValueError("no measured steps")
    return min(step_seconds, key=lambda n: (statistics.median(step_seconds[n]), -n))


class ThreadTrial:
    """Adapts the model's CPU threads during the first training steps, and again when the machine's load changes.

    After ``warmup`` steps (one-off costs, run with the fewest threads, the safe choice under load), the
    candidates take turns for up to ``rounds`` steps each, interleaved so a change of machine load hits them
    alike; then :func:`pick_threads` decides, early when one candidate is ``clear_factor`` times slower than
    another (a trial step of a bad setting is expensive). Afterwards, when the median of the last ``window``
    steps is ``clear_factor`` times the chosen setting's trial median (other processes took cores), the
    candidates are tried again; and every ``retry_every`` steps while fewer threads than the most are chosen, since
    load that made every core slow during the trial may have gone (a slower setting does not show it by itself).
    """

    def __init__(
        self,
        candidates: tuple[int, ...],
        rounds: int = 3,
        warmup: int = 1,
        window: int = 8,
        clear_factor: float = 2.0,
        retry_every: int = 200,
    ) -> None:
        self.schedule = [candidates[-1]] * warmup + [n for _ in range(rounds) for n in candidates]
        self.warmup = warmup
        self.times: dict[int, list[float]] = {n: [] for n in candidates}
        self.recent: deque[float] = deque(maxlen=window)
        self.clear_factor = clear_factor
        self.retry_every = retry_every
        self.since_choice = 0
        self.step = 0
        self.chosen: int | None = candidates[0] if len(candidates) == 1 else None
        if self.chosen is not None:
            torch.set_num_threads(self.chosen)

    def before_step(self) -> None:
        """Set the thread count for the coming step."""
        if self.chosen is None:
            torch.set_num_threads(self.schedule[self.step])

    def after_step(self, seconds: float) -> int | None:
        """Record the step's wall time; returns the chosen thread count once the trial has just ended."""
        if self.chosen is not None:
            self._watch(seconds)
            return None
        if self.step >= self.warmup:
            self.times[self.schedule[self.step]].append(seconds)
        self.step += 1
        if self.step < len(self.schedule) and not self._clear():
            return None
        self.chosen = pick_threads(self.times)
        self.since_choice = 0
        torch.set_num_threads(self.chosen)
        return self.chosen

    def _clear(self) -> bool:
        """Every candidate measured, and the slowest median ``clear_factor`` times the fastest."""
        if not all(self.times.values()):
            return False
        medians = [statistics.median(v) for v in self.times.values()]
        return max(medians) > self.clear_factor * min(medians)

    def _watch(self, seconds: float) -> None:
        """Start a new trial (without warm-up) when recent steps got much slower than the chosen setting measured, or
        periodically while a setting with fewer threads than the most is chosen."""
        if len(self.times) < 2:
            return
        self.recent.append(seconds)
        self.since_choice += 1
        baseline = statistics.median(self.times[self.chosen])
        slower = len(self.recent) == self.recent.maxlen and statistics.median(self.recent) > self.clear_factor * baseline
        if slower or (self.chosen != max(self.times) and self.since_choice >= self.retry_every):
            self.times = {n: [] for n in self.times}
            self.recent.clear()
            self.step, self.chosen = self.warmup, None

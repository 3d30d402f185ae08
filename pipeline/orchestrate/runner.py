"""Running a stage of the graph: in the workspace (CLI, ``dvc repro``) or into the store (flows).

Both go through the same stage function with the same inputs; they differ only in where the output
lands and which record says so (``pipeline.orchestrate.store``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import WouldOverwrite
from pipeline.io import LEGACY_AGE_S, atomic_write_json, check_writable, remove_stale_temporaries
from pipeline.layout import Layout, StageRun
from pipeline.orchestrate import store
from pipeline.orchestrate.graph import GRAPH

log = logging.getLogger("astroflow.stages")


@dataclass(frozen=True)
class Outcome:
    """What one stage run did: ``built``, ``checked out`` (from the store), ``hit`` or ``adopted`` (store side)."""

    stage: str
    how: str
    summary: dict[str, Any]
    key: str | None
    path: Path
    seconds: float


def run_in_workspace(
    name: str, cfg: Config, layout: Layout, *, progress: bool = True, resume: bool = False, force: bool = False
) -> Outcome:
    """Run ``name`` into its workspace directory, or check it out of the store when the store has its key.

    A resumable stage (train) whose outputs exist runs only with ``resume`` or ``force``: forgetting
    ``--resume`` after a crash must not throw away a long run.
    """
    spec = GRAPH[name]
    out = layout.stage_dir(name)
    refuse_overwrite(name, layout, resume=resume, force=force)
    summary_file = layout.resolve(spec.summary_file) if spec.summary_file else None
    remove_leftovers(out, summary_file)
    key = store.workspace_key(name, cfg, layout) if spec.stored else None
    t0 = time.perf_counter()
    if key is not None and not resume:
        where = store.StageDir(layout.resolve(cfg.schedule.cache_root), name, key)
        if where.complete() is not None:
            summary = store.check_out(where, out)["summary"]
            if summary_file is not None:
                atomic_write_json(summary_file, summary)
            log.info("%s: the store already holds key %s; linked it into %s", name, key, out)
            return Outcome(name, "checked out", summary, key, out, time.perf_counter() - t0)
    (out / store.WORKSPACE_MARKER).unlink(missing_ok=True)
    run = StageRun(cfg, out, {u: layout.stage_dir(u) for u in spec.upstream}, layout.root, progress, resume, summary_file)
    summary = spec.function(run)
    seconds = time.perf_counter() - t0
    if key is not None:
        store.write_workspace_record(out, name, key, summary, seconds)
    return Outcome(name, "built", summary, key, out, seconds)


def remove_leftovers(out: Path, summary_file: Path | None) -> None:
    """Remove the temporaries killed runs left beside the outputs (``pipeline.io``'s rule; the workspace is the CLI's,
    so earlier versions' pid-less names too)."""
    for directory in {out, out.parent, *([summary_file.parent] if summary_file is not None else [])}:
        remove_stale_temporaries(directory, legacy_age_s=LEGACY_AGE_S)


def refuse_overwrite(name: str, layout: Layout, *, resume: bool, force: bool) -> None:
    """Raise when an output directory of ``name`` cannot be written (a user error before any work, not a traceback
    after an epoch), or when ``name`` is resumable, its outputs exist, and neither ``resume`` nor ``force`` was asked."""
    spec = GRAPH[name]
    out = layout.stage_dir(name)
    check_writable(out)
    if spec.summary_file:
        check_writable(layout.resolve(spec.summary_file).parent)
    existing = [o.path for o in spec.outs if spec.resumable and (out / o.path).exists()]
    if existing and not (resume or force):
        raise WouldOverwrite(
            f"{out}: holds a {name} run ({', '.join(existing)}); pass --resume to continue it or --force to replace it"
        )


def run_in_store(
    where: store.StageDir,
    cfg: Config,
    inputs: Mapping[str, Path],
    layout: Layout,
    *,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Outcome:
    """Reuse, adopt from the workspace, or build ``where``; heavy work runs isolated in a child process."""
    spec = GRAPH[where.stage]
    t0 = time.perf_counter()

    def make(tmp: Path) -> dict[str, Any]:
        return spec.function(StageRun(cfg, tmp, dict(inputs), layout.root, progress=False, isolate=True))

    record, how = store.build(where, make, adopt_from=layout.stage_dir(where.stage), logger=logger)
    return Outcome(where.stage, how, record["summary"], where.key, where.path, time.perf_counter() - t0)

"""Work around a Prefect 3.8 bug that makes every forked child of a Prefect process exit with status 1.

Prefect's queue services (the API log and event workers) register a threading-atexit ``drain``; in a forked
child, Prefect's at-fork hook resets them to ``_done_event = None`` but leaves that atexit callback in place, so
the child's exit fails an ``assert`` inside it. Work done in the child is fine, but its exit status is 1, and
PyTorch then reports "DataLoader worker exited unexpectedly". After Prefect's own reset, this hook marks the
reset services as already drained, so the child's exit is clean. Imported by ``flows``.
"""

from __future__ import annotations

import asyncio
import os

from prefect._internal.concurrency import services  # its at-fork reset registers first; this hook runs after it


def mark_reset_services_drained() -> None:
    """In a fork child: give each service Prefect reset a set done-event, so its atexit drain returns at once."""
    for service in list(services._active_services):
        if getattr(service, "_done_event", True) is None:
            done = asyncio.Event()
            done.set()
            service._done_event = done


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=mark_reset_services_drained)

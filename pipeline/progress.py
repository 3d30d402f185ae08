"""Progress for people and for log files: a live bar on a terminal, a plain line every few seconds elsewhere.

``from pipeline.progress import tqdm`` is a drop-in for ``tqdm.auto.tqdm``. When stderr is not a terminal
(a log file, a pipe, a CI job, a Prefect worker) a redrawn bar would write thousands of carriage-return
updates into the log, so the same counters are printed instead as whole lines, at most one every
:data:`LOG_EVERY_S` seconds, plus a last one when the bar closes.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm as _terminal_tqdm

LOG_EVERY_S = float(os.environ.get("ASTROFLOW_PROGRESS_EVERY_S", 10.0))
"""Seconds between progress lines off a terminal (environment: ``ASTROFLOW_PROGRESS_EVERY_S``)."""
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) in {elapsed}, {rate_fmt}, {remaining} left"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} in {elapsed}, {rate_fmt}"


class tqdm(_terminal_tqdm):  # noqa: N801 - named after the class it stands in for
    """``tqdm.auto.tqdm`` on a terminal; otherwise whole lines on stderr, throttled to one per ``LOG_EVERY_S``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._as_lines = not sys.stderr.isatty() and kwargs.get("file") is None
        if self._as_lines:
            no_total = kwargs.get("total") is None and not (args and hasattr(args[0], "__len__"))
            kwargs.update(
                file=io.StringIO(),  # tqdm's own redraws and closing newline go nowhere
                mininterval=LOG_EVERY_S,
                bar_format=LINE_FORMAT_NO_TOTAL if no_total else LINE_FORMAT,
                dynamic_ncols=False,
            )
        self._last_line, self._last_n = time.monotonic(), 0
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        """One whole line per refresh (not for the empty line tqdm draws to clear a bar, nor before any progress)."""
        if not self._as_lines:
            return super().display(msg, pos)
        now = time.monotonic()
        final = self.total is not None and self.n >= self.total
        due = final or now - self._last_line >= LOG_EVERY_S  # set_postfix redraws every step: throttle here too
        if msg != "" and due:
            self._line(msg, now)
        return True

    def close(self) -> None:
        """The last count as a line, also for bars that vanish on a terminal (``leave=False``)."""
        if self._as_lines and not self.disable:
            self._line(None, time.monotonic())
        super().close()

    def _line(self, msg: str | None, now: float) -> None:
        if self.n > self._last_n:
            print(self.__str__() if msg is None else msg, file=sys.stderr, flush=True)
            self._last_line, self._last_n = now, self.n

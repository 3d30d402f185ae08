"""Progress for people and for log files: a live bar on a terminal, a plain line every few seconds elsewhere.

``from pipeline.progress import tqdm`` is a drop-in for ``tqdm.auto.tqdm``. When stderr is not a terminal
(a log file, a pipe, a CI job, a Prefect worker) a redrawn bar would write thousands of carriage-return
updates into the log, so the same counters are printed instead as whole lines, at most one every
:data:`LOG_EVERY_S` seconds, plus a last one when the bar closes.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from tqdm.auto import tqdm as _terminal_tqdm

LOG_EVERY_S = 10.0
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
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        """One whole line per refresh (not for the empty line tqdm draws to clear a bar, nor before any progress)."""
        if not self._as_lines:
            return super().display(msg, pos)
        if msg != "" and self.n > 0:
            print(self.__str__() if msg is None else msg, file=sys.stderr, flush=True)
        return True

"""A small progress bar for long start-up work (model load, warm-up).

Where it reports follows the daemon's log setup (``logs.setup_logging``) on the same stream:

- text logs (or no log setup) on a terminal: one line redrawn in place;
- JSON logs, or text logs that are not on a terminal (the systemd journal, a file): a few log
  records of the ``livelm.progress`` logger, one per quarter of the work, with the fields
  ``stage``, ``done``, ``total`` and ``seconds``, so a JSON log stays one object per line;
- no log setup and no terminal (benchmarks, library use): the same few lines as plain text.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from types import TracebackType
from typing import TextIO

from livelm.daemon.logs import console_format

_BAR_WIDTH = 30
_REDRAW_SECONDS = 0.1  # at most ten redraws a second on a terminal
_LOG_STEPS = 4  # plain lines at 25%, 50%, 75%, 100%

log = logging.getLogger("livelm.progress")


class Output(enum.Enum):
    BAR = "bar"  # redrawn in place on a terminal
    LINES = "lines"  # plain text lines
    RECORDS = "records"  # log records


def output_for(stream: TextIO) -> Output:
    """How progress is reported on ``stream``, given the log format set up for it."""
    fmt = console_format(stream)
    if _is_tty(stream) and fmt in (None, "text"):
        return Output.BAR
    return Output.LINES if fmt is None else Output.RECORDS


class Progress:
    """``with Progress(total, "loading weights") as bar: bar.update(1)``."""

    def __init__(
        self, total: int, desc: str, stream: TextIO | None = None, *, enabled: bool = True
    ) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.done = 0
        self._output = output_for(self.stream)
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._logged_steps = 0

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        if self._output is Output.BAR:
            self._draw()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        if self._output is Output.BAR:
            self._draw()
            self._write("\n" if exc is None else " failed\n")
        elif exc is None and self._logged_steps < _LOG_STEPS:
            self._write_line()

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        if not self.enabled:
            return
        if self._output is Output.BAR:
            now = time.monotonic()
            if now - self._last_draw >= _REDRAW_SECONDS or self.done == self.total:
                self._draw()
            return
        step = self._step()
        if step > self._logged_steps:
            self._logged_steps = step
            self._write_line()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def _fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def _step(self) -> int:
        return int(self._fraction() * _LOG_STEPS)

    def _draw(self) -> None:
        if not self.enabled:
            return
        self._last_draw = time.monotonic()
        filled = int(self._fraction() * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        self._write(f"\r{self.desc} [{bar}] {self._counts()}")

    def _write_line(self) -> None:
        if self._output is Output.LINES:
            self._write(f"{self.desc}: {self._counts()}\n")
            return
        fields = {
            "stage": self.desc,
            "done": self.done,
            "total": self.total,
            "seconds": round(self.elapsed, 3),
        }
        log.info("%s: %s", self.desc, f"{self._fraction():.0%}", extra=fields)

    def _counts(self) -> str:
        return f"{self._fraction():4.0%} ({self.done}/{self.total}) {self.elapsed:.1f}s"

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

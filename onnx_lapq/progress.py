"""Progress of a run on a text stream, fed by quantize()'s on_step callback.

On a terminal: one bar with ETA, redrawn in place.  On anything else (a log file, a
pipe): a line every ``interval`` seconds while a stage runs, and one when it ends.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from .pipeline import Progress


class ProgressBar:
    """Renders :class:`Progress` events as ``stage [#####.....] done/total ETA 12s best loss 0.0123``."""

    def __init__(self, stream: TextIO, width: int = 30, interval: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.stream = stream
        self.width = width
        self.interval = interval
        self.clock = clock
        self.stage: str | None = None
        self.started = 0.0
        self.printed = 0.0
        self.interactive = stream.isatty()

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        if progress.stage != self.stage:
            self.close()
            self.stage, self.started, self.printed = progress.stage, now, now
        elapsed = now - self.started
        if progress.total:
            frac = min(progress.done / progress.total, 1.0)
            bar = "#" * int(frac * self.width)
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            line = f"{progress.stage:<10} [{bar:<{self.width}}] {progress.done}/{progress.total} ETA {eta:4.0f}s"
        else:
            line = f"{progress.stage:<10} {progress.done} done, {elapsed:.0f}s"
        if progress.loss is not None:
            line += f" best loss {progress.loss:.4g}"
        if self.interactive:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif now - self.printed >= self.interval:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.printed = now
        self._last = line

    def close(self, finished: bool = True) -> None:
        """End the current stage's line.  A stage that did not finish (an error stops the run)
        gets no closing line on a non-interactive stream, so that the error comes last, alone
        when it came early."""
        if self.stage is not None:
            if not self.interactive and finished:
                self.stream.write(getattr(self, "_last", "") + "\n")
            elif self.interactive:
                self.stream.write("\n")
            self.stream.flush()
            self.stage = None

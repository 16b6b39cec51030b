"""Progress of a run on a text stream, fed by quantize()'s on_step callback.

On a terminal: one bar with ETA, redrawn in place at each event.  On anything else (a log
file, a pipe): a line every ``interval`` seconds while a stage runs, whether or not its
events arrive (a heartbeat thread, started by the first event, prints the stage's state
when no line came for ``interval`` seconds: its counts, elapsed time, ETA and best loss
when it has them, else how long it has been working), and one line when the stage ends.
:meth:`ProgressBar.close` ends the last stage and the heartbeat: nothing is written after
it, and later events are ignored.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Progress:
    """What ``on_step`` receives: a stage name, work done, the total when known, and the
    best loss so far during a search.  The stages: calibrate, then each method's own
    (N:M sparsity's repair sends sparsify and weight reconstruction reconstruct, a layer at a
    time; lapq sends start, for its
    evaluator, Lp sweep and start candidates, and search), export, fidelity; each sends an event as it begins or as its work advances."""

    stage: str
    done: int
    total: int | None
    loss: float | None = None


class ProgressBar:
    """Renders :class:`Progress` events as ``stage [#####.....] done/total in 12s, ETA 34s, best loss 0.0123``.

    On a stream that is no terminal a heartbeat thread prints the line every ``interval``
    seconds until :meth:`close`: use the bar in a ``with`` block, or close it."""

    def __init__(self, stream: TextIO, width: int = 30, interval: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.stream = stream
        self.width = width
        self.interval = interval
        self.clock = clock
        self.interactive = stream.isatty()
        self.progress: Progress | None = None  # the current stage's last event
        self.started = 0.0
        self.printed = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __call__(self, progress: Progress) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            now = self.clock()
            if self.progress is None or progress.stage != self.progress.stage:
                self._end_stage(finished=True)
                self.started = self.printed = now
            self.progress = progress
            if self.interactive:
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
            elif now - self.printed >= self.interval:
                self._print(now)
        if not self.interactive and self.interval > 0 and self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat_until_closed, name="onnx_lapq-progress", daemon=True)
            self._heartbeat.start()

    def beat(self) -> None:
        """Print the current stage's line if none was printed for ``interval`` seconds (a
        non-interactive stream only): what the heartbeat thread does between events."""
        with self._lock:
            if self.interactive or self._closed.is_set() or self.progress is None:
                return
            now = self.clock()
            if now - self.printed >= self.interval:
                self._print(now)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)

    def close(self, finished: bool = True) -> None:
        """End the current stage's line and the heartbeat.  A stage that did not finish (an
        error stops the run) gets no closing line on a non-interactive stream, so that the
        error comes last, alone when it came early."""
        with self._lock:
            self._end_stage(finished)
            self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    def _beat_until_closed(self) -> None:
        while not self._closed.wait(min(self.interval, 1.0)):
            self.beat()

    def _end_stage(self, finished: bool) -> None:
        if self.progress is None:
            return
        line = self._line(self.clock(), closing=True)
        if self.interactive:
            self.stream.write("\r" + line + "\n")
        elif finished:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.progress = None

    def _print(self, now: float) -> None:
        self.stream.write(self._line(now) + "\n")
        self.stream.flush()
        self.printed = now

    def _line(self, now: float, closing: bool = False) -> str:
        """The current stage at ``now``: counts, elapsed time and ETA when the stage gives
        them; a stage without counts is "still working" (or "finished" when ``closing``)."""
        progress = self.progress
        elapsed = now - self.started
        if progress.total:
            frac = min(progress.done / progress.total, 1.0)
            bar = "#" * int(frac * self.width)
            line = f"{progress.stage:<10} [{bar:<{self.width}}] {progress.done}/{progress.total}"
            line += f" in {elapsed:.0f}s, ETA {elapsed / frac - elapsed:.0f}s" if frac > 0 else f", still working, {elapsed:.0f}s"
        elif progress.done:
            line = f"{progress.stage:<10} {progress.done} done, {elapsed:.0f}s"
        else:
            line = f"{progress.stage:<10} {'finished' if closing else 'still working'}, {elapsed:.0f}s"
        if progress.loss is not None:
            line += f", best loss {progress.loss:.4g}"
        return line

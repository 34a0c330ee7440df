"""Terminal output for the CLI: progress for steps that take over a second, on stderr, quiet when piped."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from ..units import human_bytes

__all__ = ["Reporter", "human_bytes"]


_human = human_bytes   # the name cli.py and demo.py import


class Reporter:
    """Shows what dynsnap is doing, on stderr. On a terminal: a rich progress line per step (spinner, bar,
    bytes, elapsed); otherwise one plain line per step that took longer than a second. ``quiet`` silences
    everything (used with --json). ``update`` is the library's progress callback: (phase, done, total)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._phase: Optional[str] = None
        self._t0 = 0.0
        self._total = 0
        self._lock = threading.Lock()
        self._progress = None
        self._task = None

    def _rich(self):
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      DownloadColumn(binary_units=True), TimeElapsedColumn(),
                                      console=Console(file=self.stream), transient=True)
            self._progress.start()
        return self._progress

    def start(self, phase: str) -> None:
        with self._lock:
            self._finish_locked()
            self._phase, self._t0, self._total = phase, time.perf_counter(), 0
            if self.tty and not self.quiet:
                self._task = self._rich().add_task(phase, total=None)

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self.start(phase)
        with self._lock:
            self._total = total
            if self._task is not None and self._progress is not None:
                self._progress.update(self._task, completed=done, total=total if total > 1 else None)

    def _finish_locked(self) -> None:
        if self._phase is None:
            return
        el = time.perf_counter() - self._t0
        if self._progress is not None:
            self._progress.stop()          # transient: the live line disappears
            self._progress = self._task = None
        if not self.quiet and (el >= 1.0 or self.tty):
            extra = f" ({_human(self._total)})" if self._total > 1 else ""
            self.stream.write(f"  {self._phase}: {el:.2f} s{extra}\n")
            self.stream.flush()
        self._phase = None

    def finish(self) -> None:
        with self._lock:
            self._finish_locked()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()          # also on errors: the live line must not outlive the command

    @contextmanager
    def step(self, phase: str) -> Iterator[None]:
        self.start(phase)
        try:
            yield
        finally:
            self.finish()

    def say(self, text: str) -> None:
        if self.quiet:
            return
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()

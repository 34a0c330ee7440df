"""Terminal output for the CLI: progress for steps that take over a second, on stderr, quiet when piped."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["Reporter"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    """Shows what dynsnap is doing. On a terminal: a live line with elapsed time and bytes; otherwise one
    line per step that took longer than a second. ``quiet`` silences everything (used with --json)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._phase: Optional[str] = None
        self._t0 = 0.0
        self._done = 0
        self._total = 0
        self._lock = threading.Lock()
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def _render(self) -> None:
        with self._lock:
            if not self._phase:
                return
            el = time.perf_counter() - self._t0
            msg = f"  {self._phase} ... {el:5.1f} s"
            if self._total > 1:
                pct = 100.0 * self._done / self._total
                msg += f"  {_human(self._done)} / {_human(self._total)} ({pct:3.0f}%)"
            self.stream.write("\r\x1b[K" + msg)
            self.stream.flush()

    def _ticker(self, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            if time.perf_counter() - self._t0 > 1.0:
                self._render()

    def start(self, phase: str) -> None:
        self.finish()
        self._phase, self._t0, self._done, self._total = phase, time.perf_counter(), 0, 0
        if self.tty and not self.quiet:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._ticker, args=(self._stop,), daemon=True)
            self._thread.start()

    def update(self, phase: str, done: int, total: int) -> None:
        """Callback shape used by the library: (phase, done, total)."""
        if phase != self._phase:
            self.start(phase)
        self._done, self._total = done, total

    def finish(self) -> None:
        if self._phase is None:
            return
        el = time.perf_counter() - self._t0
        if self._stop:
            self._stop.set()
            self._thread.join()  # type: ignore[union-attr]
            self._stop = self._thread = None
        if not self.quiet:
            if self.tty:
                self.stream.write("\r\x1b[K")
            if el >= 1.0 or self.tty:
                extra = f" ({_human(self._total)})" if self._total > 1 else ""
                self.stream.write(f"  {self._phase}: {el:.2f} s{extra}\n")
            self.stream.flush()
        self._phase = None

    @contextmanager
    def step(self, phase: str) -> Iterator[None]:
        self.start(phase)
        try:
            yield
        finally:
            self.finish()

    def say(self, text: str) -> None:
        if not self.quiet:
            self.finish()
            self.stream.write(text + "\n")
            self.stream.flush()

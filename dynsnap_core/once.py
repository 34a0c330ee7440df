"""``@once``: a process-wide value made on first use.

The decorated function runs the first time it is called, under a lock (concurrent first callers wait for that
one value), and every later call returns the same value. A call that raises stores nothing: the next one tries
again. Used for the CUDA driver probe and the GPU memory service agent of this process. Imports nothing from
dynsnap_core.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

__all__ = ["once"]

T = TypeVar("T")


def once(make: Callable[[], T]) -> Callable[[], T]:
    lock = threading.Lock()
    made: list[T] = []

    @functools.wraps(make)
    def get() -> T:
        with lock:
            if not made:
                made.append(make())
            return made[0]

    return get

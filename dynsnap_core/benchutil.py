"""Helpers the benchmarks share: dropping the page cache, CPU time, an optional figure in a table."""
from __future__ import annotations

import os
import resource
from typing import Optional

__all__ = ["drop_caches", "cpu_time", "fmt_opt"]


def drop_caches() -> bool:
    """sync, then drop the page cache; False when that is not allowed (drop_caches needs root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cpu_time(children: bool = False) -> float:
    """User + system CPU seconds of this process (and of its waited-for children with ``children``)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    t = s.ru_utime + s.ru_stime
    if children:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        t += c.ru_utime + c.ru_stime
    return t


def fmt_opt(v: Optional[float]) -> str:
    """A figure to two decimals, or an empty cell for None."""
    return "" if v is None else f"{v:.2f}"

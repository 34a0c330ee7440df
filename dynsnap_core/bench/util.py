"""Helpers the benchmarks share: dropping and warming the page cache, CPU time, and the tables they print
(Markdown rows and tables, aligned plain-text rows, an optional figure in a cell)."""
from __future__ import annotations

import os
import resource
from typing import Iterable, Optional, Sequence

__all__ = ["drop_caches", "evict", "warm", "cpu_time", "fmt_opt", "md_row", "md_table", "text_row"]


def drop_caches() -> bool:
    """sync, then drop the page cache; False when that is not allowed (drop_caches needs root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(paths: Iterable[str | os.PathLike]) -> None:
    """Drop these files (and every file under these directories) from the page cache, nothing else: a cold read
    of a snapshot's images on a node whose tools (Python, CRIU) stay cached (POSIX_FADV_DONTNEED of clean pages)."""
    for p in paths:
        files = [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
        for f in files:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(paths: Iterable[str | os.PathLike]) -> None:
    """Read files, and every file under directories, through the page cache (a warm-cache run starts here)."""
    buf = bytearray(16 << 20)
    for p in paths:
        files = [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


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


def md_row(cells: Iterable[object]) -> str:
    """One Markdown table row, ``| a | b |`` (an empty cell reads ``|  |``)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Iterable[Iterable[object]] = ()) -> list[str]:
    """The lines of a Markdown table: the header, the rule under it, then one line per row of cells."""
    return [md_row(header), "|---" * len(header) + "|"] + [md_row(r) for r in rows]


def text_row(cells: Iterable[object], specs: Sequence[str]) -> str:
    """One row of a plain-text table: each cell formatted with its column's spec (``">7"``, ``"<30"``), space
    separated; a row with fewer cells than columns stops after its last cell."""
    return " ".join(format(c, spec) for c, spec in zip(cells, specs))

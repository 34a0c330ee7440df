"""Fast file I/O for snapshots: copy trees, hash, read into and write from buffers (C engine: io_uring, AIO, psync).

Every call opens its own io_uring ring or AIO context and closes it before returning, so no
ring (and no iou-wrk thread) outlives a call: a process that uses this module can still be
checkpointed by CRIU. The GIL is released for the whole I/O; checksums are XXH3-64 computed
inline while the data streams through (equal to ``xxhash.xxh3_64_hexdigest(content)``).

Errors are ``OSError`` subclasses with the errno of the failure and the file in the message
(``ENOSPC`` -> ``OSError(errno.ENOSPC)``); a destination file that was not finished is removed.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from dynsnap_core.durable import fsync_path
from dynsnap_core._lib import load
from dynsnap_core.errors import oserror

_io = load("_io", "I/O engine")

__all__ = [
    "ENGINES", "DEFAULT_BLOCK_SIZE", "DEFAULT_QUEUE_DEPTH", "FileResult", "CopyResult",
    "available_engines", "copy_tree", "copy_file", "hash_file", "read_into", "write_buffers",
]

#: Backends in the order ``engine="auto"`` tries them.
ENGINES = ("io_uring", "aio", "psync")
DEFAULT_BLOCK_SIZE: int = _io.DEFAULT_BLOCK_SIZE
DEFAULT_QUEUE_DEPTH: int = _io.DEFAULT_QUEUE_DEPTH

Progress = Callable[[int, int], Any]


@dataclass
class FileResult:
    """One file: its path (relative to the tree for copy_tree), size in bytes and XXH3-64 as 16 hex chars.

    ``xxh3`` is ``""`` when the copy ran with ``checksum=False``.
    """

    path: str
    size: int
    xxh3: str


@dataclass
class CopyResult:
    """Outcome of copy_tree: bytes copied, wall seconds, per-file results, backend used, O_DIRECT used."""

    bytes: int
    seconds: float
    files: list[FileResult] = field(default_factory=list)
    engine: str = ""
    direct: bool = False

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10**9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _hex(value: int) -> str:
    return f"{value:016x}"


def _check_engine(engine: str) -> None:
    if engine != "auto" and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose auto or one of {', '.join(ENGINES)}")


def available_engines() -> list[str]:
    """Backends that initialise on this machine (io_uring may be off by sysctl or seccomp)."""
    return [name for name in ENGINES if _io.probe(name) == 0]


def _walk(src: str) -> tuple[list[str], list[str]]:
    """Relative directories and regular files under src, sorted; refuses symlinks and special files."""
    dirs: list[str] = []
    files: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        base = os.path.join(src, rel) if rel else src
        with os.scandir(base) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            relpath = os.path.join(rel, entry.name) if rel else entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                dirs.append(relpath)
                stack.append(relpath)
            elif stat.S_ISREG(mode):
                files.append(relpath)
            else:
                kind = "symbolic link" if stat.S_ISLNK(mode) else "special file"
                raise oserror(errno.EINVAL, f"copy_tree: refusing {kind}", entry.path)
    dirs.sort()
    files.sort()
    return dirs, files


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, *, engine: str = "auto",
              direct: bool = True, checksum: bool = True, fsync: bool = True,
              block_size: Optional[int] = None, queue_depth: Optional[int] = None,
              progress: Optional[Progress] = None) -> CopyResult:
    """Copy every regular file under ``src`` to ``dst`` with the same relative layout.

    ``dst`` must not exist or be an empty directory. Symlinks and special files are refused
    (``OSError(EINVAL)`` naming the entry). Files stream through ``queue_depth`` blocks of
    ``block_size`` bytes kept in flight across files, with O_DIRECT where the file system allows
    it (``direct``), an inline XXH3-64 per file (``checksum``) and fdatasync of every file and
    directory (``fsync``). ``progress(done_bytes, total_bytes)`` is called from this thread at most
    about ten times a second. On failure everything this call created under ``dst`` is removed.
    """
    _check_engine(engine)
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise oserror(errno.ENOTDIR if os.path.exists(src) else errno.ENOENT, "copy_tree", src)
    created_root = False
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst) or os.listdir(dst):
            raise oserror(errno.EEXIST, "copy_tree: destination exists and is not an empty directory", dst)
    dirs, files = _walk(src)
    start = time.perf_counter()
    try:
        if not os.path.isdir(dst):
            os.mkdir(dst)
            created_root = True
        for rel in dirs:
            os.mkdir(os.path.join(dst, rel))
        backend, res = _io.copy_files(
            [os.path.join(src, f) for f in files], [os.path.join(dst, f) for f in files],
            engine=engine, direct=direct, checksum=checksum, fsync=fsync, block_size=block_size,
            queue_depth=queue_depth, progress=progress, progress_ms=100)
        if fsync:
            for rel in dirs:
                fsync_path(os.path.join(dst, rel))
            fsync_path(dst)
            if created_root:
                fsync_path(os.path.dirname(os.path.abspath(dst)))
    except BaseException:
        if created_root:
            shutil.rmtree(dst, ignore_errors=True)
        elif os.path.isdir(dst):
            for name in os.listdir(dst):
                path = os.path.join(dst, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        raise
    seconds = time.perf_counter() - start
    if not files:
        backend = engine if engine != "auto" else (available_engines() or ["psync"])[0]
    results = [FileResult(f, size, _hex(h) if checksum else "") for f, (size, h, _d) in zip(files, res)]
    big = [d for (size, _h, d) in res if size >= _io.ALIGN]
    return CopyResult(bytes=sum(r.size for r in results), seconds=seconds, files=results,
                      engine=backend, direct=bool(big) and all(big))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, *, engine: str = "auto",
              direct: bool = True, checksum: bool = True, fsync: bool = True,
              block_size: Optional[int] = None, queue_depth: Optional[int] = None,
              progress: Optional[Progress] = None) -> FileResult:
    """Copy one regular file (``dst`` must not exist); returns its name (basename of dst), size and XXH3."""
    _check_engine(engine)
    src, dst = os.fspath(src), os.fspath(dst)
    _backend, res = _io.copy_files([src], [dst], engine=engine, direct=direct, checksum=checksum,
                                   fsync=fsync, block_size=block_size, queue_depth=queue_depth,
                                   progress=progress, progress_ms=100)
    size, h, _d = res[0]
    return FileResult(os.path.basename(dst), size, _hex(h) if checksum else "")


def hash_file(path: str | os.PathLike, *, engine: str = "auto", direct: bool = True,
              block_size: Optional[int] = None, queue_depth: Optional[int] = None) -> FileResult:
    """Size and XXH3-64 of a file, read once (O_DIRECT where possible, so the page cache is not churned)."""
    _check_engine(engine)
    path = os.fspath(path)
    _backend, size, h, _d = _io.hash_file(path, engine=engine, direct=direct, block_size=block_size,
                                          queue_depth=queue_depth)
    return FileResult(path, size, _hex(h))


def read_into(path: str | os.PathLike, buffer: Any, offset: int = 0, *, engine: str = "auto",
              direct: bool = True) -> int:
    """Read the whole file into ``buffer[offset:]`` (any writable contiguous buffer); returns its size.

    A file larger than the space left raises ``OSError(EOVERFLOW)``. With a 4096-aligned target
    (e.g. an mmap) the aligned head is read with O_DIRECT and the tail through the page cache.
    """
    _check_engine(engine)
    if offset < 0:
        raise ValueError("offset must be >= 0")
    _backend, n = _io.read_into(os.fspath(path), buffer, offset, engine=engine, direct=direct)
    return n


def write_buffers(path: str | os.PathLike, buffers: Iterable[Any] | Sequence[Any], *,
                  engine: str = "auto", fsync: bool = True, direct: bool = True,
                  block_size: Optional[int] = None, queue_depth: Optional[int] = None) -> FileResult:
    """Create (or truncate) ``path`` and write the buffers in order; returns size and XXH3 of the content.

    With ``direct`` (and a file system that takes O_DIRECT) the data bypasses the page cache: pieces
    that are page-aligned in memory and in the file are written from the caller's memory, the rest is
    gathered into aligned staging blocks; the file is truncated to its exact size at the end.
    With ``fsync`` the file and its directory are synced before returning; on failure the file is removed.
    """
    _check_engine(engine)
    path = os.fspath(path)
    _backend, size, h, _d = _io.write_buffers(path, buffers, engine=engine, fsync=fsync, direct=direct,
                                              block_size=block_size, queue_depth=queue_depth)
    return FileResult(path, size, _hex(h))

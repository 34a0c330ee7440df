"""Durable file system writes, the one implementation every writer uses: fsync a file or directory by path,
write a file atomically (temporary name, fsync, rename, fsync of the directory), publish a file another function
fills, rename without replacing (renameat2 RENAME_NOREPLACE); and the bytes under a tree.

A bottom module: it imports nothing from dynsnap_core.
"""
from __future__ import annotations

import ctypes
import errno
import os
import uuid
from pathlib import Path
from typing import Callable, Optional

__all__ = ["fsync_path", "tree_bytes", "write_atomic", "publish", "rename_noreplace"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync(2) the file or directory at ``path`` (a directory after entries were created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (not following links; files that vanish while walked count 0)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def write_atomic(dest: str | os.PathLike, data: bytes, *, tmp: Optional[str | os.PathLike] = None,
                 mode: int = 0o644, durable: bool = True) -> None:
    """Make ``dest`` hold ``data`` atomically: written to ``tmp`` (default: a hidden unique name next to it;
    never through a symlink), fsynced, renamed over ``dest``, the directory fsynced. ``durable=False`` skips
    both fsyncs (run-time state on tmpfs)."""
    dest = Path(dest)
    tmp = Path(tmp) if tmp is not None else dest.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, dest)
    if durable:
        fsync_path(dest.parent)


def publish(dest: Path, write: Callable[[Path], None]) -> None:
    """Make ``dest`` appear atomically: ``write(tmp)`` fills (and fsyncs) a temporary file next to it, which is
    renamed to ``dest``, then the directory is fsynced; the temporary file is removed if anything fails."""
    directory = dest.parent
    tmp = directory / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.rename(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_path(directory)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """rename(2) that never replaces: renameat2(RENAME_NOREPLACE). FileExistsError when ``dst`` exists (also
    with a libc without renameat2, checked first), OSError for anything else."""
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    fn = getattr(libc, "renameat2", None)
    if fn is None:                                   # very old libc: fall back to a checked rename
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
        os.rename(src, dst)
        return
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(dst))

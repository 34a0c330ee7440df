"""File system helpers shared by every writer: fsync a file or a directory by its path, bytes under a tree."""
from __future__ import annotations

import os

__all__ = ["fsync_path", "tree_bytes"]


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

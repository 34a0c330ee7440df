"""Durability helper shared by every writer: fsync a file or a directory by its path."""
from __future__ import annotations

import os

__all__ = ["fsync_path"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync(2) the file or directory at ``path`` (a directory after entries were created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

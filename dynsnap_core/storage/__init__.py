"""Where snapshots are kept: the node's file system (a PVC or hostPath) and S3-compatible object storage."""
from __future__ import annotations

import re
from typing import Optional

from ..errors import DynsnapError

__all__ = ["NAME", "check_name", "open_remote"]

#: A snapshot name: one path component of letters, digits, '.', '_' and '-', not starting with '.'.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """``name`` if it is a safe snapshot name, else DynsnapError saying what is wrong with it."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        raise DynsnapError(f"snapshot name {shown} is not allowed: use 1 to 128 letters, digits, '.', '_' or '-', "
                           "not starting with '.' and without '..'", stage="preflight")
    return name


def open_remote(url: Optional[str], **kw):
    """The object store for ``url`` (``s3://BUCKET[/PREFIX]``), or None for local storage only."""
    if not url:
        return None
    if url.startswith("s3://"):
        from .s3 import S3Store
        return S3Store(url, **kw)
    raise DynsnapError(f"storage URL {url!r} is not supported: use s3://BUCKET[/PREFIX]", stage="storage")

"""Where snapshots are kept: the node's file system (a PVC or hostPath) and S3-compatible object storage."""
from __future__ import annotations

from typing import Optional

from ..errors import DynsnapError
from .names import NAME, check_name

__all__ = ["NAME", "check_name", "open_remote", "split_url", "fetch", "remote_snapshot"]

def open_remote(url: Optional[str], **kw):
    """The object store for ``url`` (``s3://BUCKET[/PREFIX]``), or None for local storage only."""
    if not url:
        return None
    if url.startswith("s3://"):
        from .s3 import S3Store
        return S3Store(url, **kw)
    raise DynsnapError(f"storage URL {url!r} is not supported: use s3://BUCKET[/PREFIX]", stage="storage")


def split_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX/NAME`` -> (``s3://BUCKET/PREFIX``, ``NAME``)."""
    base, _, name = url.rstrip("/").rpartition("/")
    if not url.startswith("s3://") or base in ("s3:", "s3:/") or not name:
        raise DynsnapError(f"{url!r} does not name a snapshot: use s3://BUCKET[/PREFIX]/NAME", stage="storage")
    return base, check_name(name)


def remote_snapshot(url: str):
    """A Snapshot object for a snapshot in object storage (its manifest, checked against its marker), for
    ``dynsnap check``; its path is where ``fetch`` would put it."""
    from ..snapshot import Snapshot, default_home
    base, name = split_url(url)
    store = open_remote(base)
    return Snapshot(default_home() / "cache" / "snapshots" / name, store.manifest(name))


def fetch(url: str, cache=None, progress=None):
    """Download ``s3://BUCKET/PREFIX/NAME`` into the node cache (default ``$DYNSNAP_HOME/cache/snapshots``) after
    checking that this node can restore it; return the verified local path."""
    from pathlib import Path

    from ..compat import require
    from ..config import home as default_home
    base, name = split_url(url)
    store = open_remote(base)
    cache = Path(cache) if cache else default_home() / "cache" / "snapshots"
    if not (cache / name).is_dir():
        from ..snapshot import Snapshot
        require(Snapshot(cache / name, store.manifest(name)), images=False)
    return store.download(name, cache, progress=progress)

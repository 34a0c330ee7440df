"""Content-addressed weight directory: each region's bytes stored once, named by its digest and size.

Layout: ``ROOT/objects/<digest>-<size>`` (digest = ``memfd.digest``, 16 hex chars). Ten snapshots of
one model share one copy of its weights. Objects appear atomically (written under a temporary name,
fsynced, renamed); an object is never rewritten. Loading checks the digest before a region is
handed out, so a damaged object is refused, not served.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import config, memfd
from ..durable import fsync_path

__all__ = ["WeightDir", "StoredRegion", "default_store"]

_NAME = re.compile(r"^([0-9a-f]{16})-([0-9]+)$")


def default_store() -> Path:
    """``$DYNSNAP_WEIGHTS`` else ``<dynsnap home>/weights``."""
    return config.weights_store()


def publish(dest: Path, write: Callable[[Path], None]) -> None:
    """Make ``dest`` appear atomically: ``write(tmp)`` fills (and fsyncs) a temporary file next to it, which is
    renamed to ``dest``, then the directory is fsynced; the temporary file is removed if anything fails.
    Shared by the weight directory's objects and the weight store's manifests."""
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


@dataclass
class StoredRegion:
    """A region in the store: digest, size, file path, and whether this call wrote it (False: deduplicated)."""

    digest: str
    size: int
    path: str
    written: bool = False

    def to_dict(self) -> dict:
        return {"digest": self.digest, "size": self.size, "path": self.path, "written": self.written}


class WeightDir:
    """A content-addressed directory of region files."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_store()
        self.objects = self.root / "objects"

    def path(self, digest: str, size: int) -> Path:
        return self.objects / f"{digest}-{size}"

    def has(self, digest: str, size: int) -> bool:
        p = self.path(digest, size)
        try:
            return p.stat().st_size == size
        except FileNotFoundError:
            return False

    def put(self, region: memfd.MemFd, threads: Optional[int] = None) -> StoredRegion:
        """Store a region's content unless the same content is already there; returns where it lives."""
        dig = region.digest or region.compute_digest(threads)
        dest = self.path(dig, region.size)
        if self.has(dig, region.size):
            return StoredRegion(dig, region.size, str(dest), written=False)
        self.objects.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            [res] = memfd.dump([region], [tmp], threads, fsync=True)
            if res.digest != dig:
                raise memfd.MemfdError(f"region {region.name!r} changed while it was stored "
                                       f"(digest {res.digest}, expected {dig})", stage="store", path=str(tmp))
        publish(dest, write)
        return StoredRegion(dig, region.size, str(dest), written=True)

    def segment(self, digest: str, size: int, name: Optional[str] = None) -> memfd.Segment:
        """The segment that restores this object, with its digest to check."""
        return memfd.Segment(str(self.path(digest, size)), 0, size, name=name, digest=digest)

    def list(self) -> list[StoredRegion]:
        out = []
        if self.objects.is_dir():
            for p in sorted(self.objects.iterdir()):
                m = _NAME.match(p.name)
                if m:
                    out.append(StoredRegion(m.group(1), int(m.group(2)), str(p)))
        return out

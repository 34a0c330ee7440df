"""Verifying a weight set's shards on disk: size, region digest, and (``deep``) each tensor's own checksum."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence

from .. import memfd
from ..errors import ShardCorrupt, SnapshotCorrupt

if TYPE_CHECKING:
    from .format import WeightSet


def _verify_set(ws: WeightSet, *, deep: bool = False, threads: Optional[int] = None) -> int:
    total = 0
    for i, s in enumerate(ws.shards):
        path = ws.shard_path(i)
        names = [t.name for t in ws.tensors_in(i)]
        first = names[0] if names else None
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ShardCorrupt(f"shard {path} of weight set {ws.name!r} is missing (tensors {_few(names)})",
                               shard=path, tensor=first, path=path) from None
        if size != s.size:
            raise ShardCorrupt(f"shard {path} is truncated or resized: {size} bytes, the manifest says {s.size} "
                               f"(tensors {_few(names)})", shard=path, tensor=first, path=path)
        try:
            [m] = memfd.restore([memfd.Segment(path, 0, s.size, name="dynsnap-verify", digest=s.digest)], threads)
        except SnapshotCorrupt as e:
            bad = _bad_tensors(ws, i, path)
            raise ShardCorrupt(f"shard {path} fails its checksum ({e.message}); damaged tensor(s): {_few(bad or names)}",
                               shard=path, tensor=(bad or names or [None])[0], path=path) from None
        with m:
            if deep:
                view = m.view(writable=False)
                for t in ws.tensors_in(i):
                    if memfd.digest(view[t.offset:t.offset + t.nbytes], threads) != t.checksum:
                        raise ShardCorrupt(f"tensor {t.name!r} in shard {path} fails its checksum",
                                           shard=path, tensor=t.name, path=path)
                view.release()
        total += s.size
    return total


def _bad_tensors(ws: WeightSet, i: int, path: str) -> list[str]:
    """Tensors of shard i whose own checksum fails (read through the page cache)."""
    import mmap
    bad = []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return [t.name for t in ws.tensors_in(i)]
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                mv = memoryview(mm)
                for t in ws.tensors_in(i):
                    if t.offset + t.nbytes > size or memfd.digest(mv[t.offset:t.offset + t.nbytes]) != t.checksum:
                        bad.append(t.name)
                mv.release()
    except OSError:
        return []
    return bad


def _few(names: Sequence[str], n: int = 3) -> str:
    if not names:
        return "none"
    s = ", ".join(repr(x) for x in names[:n])
    return s + (f" and {len(names) - n} more" if len(names) > n else "")

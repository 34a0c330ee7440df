"""Snapshots whose worker keeps regions in the memory service: the regions are stored once (by content) in a
weight directory and named in the manifest (entry ``weights``, format ``formats.SNAPSHOT_WEIGHTS``); at restore
the service loads them (parallel memfd restore) while CRIU restores the worker.

Snapshot orchestration calls down into the memory service's client here; the service never calls up.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import SnapshotCorrupt
from ..formats import SNAPSHOT_WEIGHTS
from ..memsvc.client import Client

__all__ = ["REGIONS_MAGIC", "REGIONS_FORMAT", "read_regions", "checkpoint_with_regions", "restore_with_regions"]


REGIONS_MAGIC = SNAPSHOT_WEIGHTS.magic


REGIONS_FORMAT = SNAPSHOT_WEIGHTS.format


def read_regions(snapshot_dir: str | os.PathLike) -> Optional[dict]:
    """The snapshot's regions kept outside the image (the manifest's ``weights`` entry), or None."""
    from . import manifest as mf
    m = mf.read(Path(snapshot_dir))
    meta = m.get("weights")
    if meta is None:
        return None
    p = Path(snapshot_dir) / mf.MANIFEST_NAME
    if not isinstance(meta, dict) or meta.get("magic") != REGIONS_MAGIC or meta.get("format") != REGIONS_FORMAT:
        raise SnapshotCorrupt(f"{p} has a malformed 'weights' entry (not dynsnap weights format "
                              f"{REGIONS_FORMAT})", stage="restore", path=str(p))
    return meta


def checkpoint_with_regions(pid: int, out: str | os.PathLike | None, *, service: str | os.PathLike,
                            regions: list[str], store: str | os.PathLike | None = None,
                            quiesce_worker: Optional[Callable[[], Any]] = None, **kw: Any):
    """Store ``regions`` once in the weight directory (by content), let the worker detach, CRIU-checkpoint it,
    and record the regions in the snapshot's manifest (entry ``weights``, committed atomically with the rest).
    Returns the Snapshot."""
    from .checkpoint import checkpoint
    from ..weights.store import WeightDir
    wd = WeightDir(store)
    t0 = time.perf_counter()
    with Client(service) as c:
        saved = c.save(regions, wd.root)
    t_store = time.perf_counter() - t0
    if quiesce_worker is not None:
        quiesce_worker()
    meta = {"magic": REGIONS_MAGIC, "format": REGIONS_FORMAT, "store": str(wd.root.absolute()),
            "regions": [{"name": n, "digest": saved[n]["digest"], "size": saved[n]["size"]} for n in regions],
            "store_s": t_store, "written_bytes": sum(saved[n]["size"] for n in regions if saved[n]["written"])}
    return checkpoint(pid, out, extra_manifest={"weights": meta}, **kw)


def restore_with_regions(path: str | os.PathLike, *, service: str | os.PathLike,
                         store: str | os.PathLike | None = None, **kw: Any):
    """Ask the service to load the snapshot's regions (parallel memfd restore, in the service) and run the
    CRIU restore at the same time. The restored worker re-attaches (waiting until its regions are ready)."""
    from .restore import restore
    from ..weights.store import WeightDir
    meta = read_regions(path)
    with Client(service) as c:
        c.ping()                     # a service that cannot be reached is said before anything is restored
        if meta:
            wd = WeightDir(store or meta["store"])
            c.load_many([{"name": r["name"], "path": str(wd.path(r["digest"], r["size"])), "offset": 0,
                          "length": r["size"], "digest": r["digest"]} for r in meta["regions"]])
    return restore(path, **kw)

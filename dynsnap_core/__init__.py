"""dynsnap_core: checkpoint a warmed-up (GPU) worker into a snapshot and restore it in seconds.

Verbs: ``launch(cmd)`` -> pid (a worker in its own pid namespace), ``checkpoint(pid, out)`` -> Snapshot,
``restore(path)`` -> RestoredProcess, ``Snapshot.verify()``.
Subpackages: ``snapshot`` (checkpoint, restore, the manifest format, verify), ``weights`` (weight store and
loading), ``memsvc`` (host memory service), ``cuda`` (driver checkpoint API), ``compat``, ``storage``, ``agent``;
on top ``cli``, ``bench``, ``demo``. Components: ``criu``, ``io``, ``memfd``, ``journal``, ... Bottom modules:
``errors``, ``config``, ``formats``, ``durable`` (README's Layout section names every module).
"""
from __future__ import annotations

from ._version import __version__  # noqa: F401

from .errors import (CriuError, CriuUnavailable, CudaError, DynsnapError, InvalidArgument,  # noqa: F401
                     InvalidTarget,
                     PermissionDenied, ProcessNotFound, SnapshotCorrupt, SnapshotExists, SnapshotNotFound,
                     StorageError)
from .launch import launch  # noqa: F401
from .snapshot import (RestoredProcess, Snapshot, checkpoint, list_snapshots, open_snapshot,  # noqa: F401
                       remove, restore)

__all__ = [
    "__version__", "launch", "checkpoint", "restore", "remove", "open_snapshot", "list_snapshots", "Snapshot",
    "RestoredProcess",
    "DynsnapError", "InvalidArgument", "PermissionDenied", "ProcessNotFound", "InvalidTarget", "CriuUnavailable", "CriuError",
    "SnapshotExists", "SnapshotNotFound", "SnapshotCorrupt", "StorageError", "CudaError",
]

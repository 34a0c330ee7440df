"""Snapshots. Modules, bottom up: ``manifest`` (the format), ``verify`` (checking files against it), ``store``
(the snapshots on this node: home, names, list, remove, staging), ``restore`` (Snapshot, open_snapshot, restore),
``checkpoint`` (taking one).

``from dynsnap_core.snapshot import checkpoint, restore, Snapshot, ...`` keeps working: every name of those modules
is reachable here.
"""
from __future__ import annotations

from ..errors import Interrupted  # noqa: F401
from . import checkpoint as _checkpoint_mod, restore as _restore_mod, store as _store_mod
from .checkpoint import STAGING_MODES, checkpoint, choose_dump_dir, staging_setting  # noqa: F401
from .restore import PREFETCH_MODES, RestoredProcess, Snapshot, open_snapshot, restore  # noqa: F401
from .store import (STAGING_TAG, clean_stale_staging, default_home, list_snapshots, remove, resolve,  # noqa: F401
                    snapshots_root)

__all__ = ["Snapshot", "RestoredProcess", "checkpoint", "restore", "open_snapshot", "list_snapshots", "remove",
           "default_home", "Interrupted"]


def __getattr__(name: str):
    for mod in (_store_mod, _checkpoint_mod, _restore_mod):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'dynsnap_core.snapshot' has no attribute {name!r}")

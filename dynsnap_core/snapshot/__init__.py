"""Snapshots: take one (``checkpoint``), bring one back (``restore``), the manifest format (``manifest``).

``from dynsnap_core.snapshot import checkpoint, restore, Snapshot`` keeps working: every name of the
orchestration module is reachable here.
"""
from __future__ import annotations

from . import restore as _restore
from .restore import *  # noqa: F401,F403
from .restore import __all__  # noqa: F401


def __getattr__(name: str):
    return getattr(_restore, name)

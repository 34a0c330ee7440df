"""Weight sets: the format (``format``), the content-addressed store (``store``), loading into GPU or host
memory (``loader``). ``dynsnap_core.weights.save/load/verify/...`` keep working: every name of ``format`` is
reachable here.
"""
from __future__ import annotations

from . import format as _format
from .format import *  # noqa: F401,F403
from .format import __all__  # noqa: F401


def __getattr__(name: str):
    return getattr(_format, name)

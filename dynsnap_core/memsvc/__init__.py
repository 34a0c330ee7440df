"""The memory service: a daemon that holds memfd regions across a worker's checkpoint and restore.

Every name of ``service`` is reachable here (``memsvc.Client``, ``memsvc.spawn``, ...).
"""
from __future__ import annotations

from . import service as _service
from .service import *  # noqa: F401,F403
from .service import __all__  # noqa: F401


def __getattr__(name: str):
    return getattr(_service, name)

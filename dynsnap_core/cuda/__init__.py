"""The CUDA side of dynsnap: the driver checkpoint API (``driver``) and the ``dynsnap cuda`` commands (``cli``).

``from dynsnap_core import cuda; cuda.lock(pid)`` keeps working: every name of ``driver`` is reachable here.
The GPU memory service (``dynsnap_core.gms``) builds on this package.
"""
from __future__ import annotations

from . import driver as _driver
from .driver import *  # noqa: F401,F403
from .driver import __all__  # noqa: F401


def __getattr__(name: str):
    return getattr(_driver, name)

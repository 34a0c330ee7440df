"""The host memory service: ``protocol`` (the wire: framed JSON + fds, peer credentials), ``client`` (Client,
Attachment, quiesce, resume: what workers and dynsnap use), ``service`` (the daemon: MemoryService, spawn, main).

``from dynsnap_core import memsvc; memsvc.Client(...)`` keeps working. The submodules load when first used, so
that ``memfd`` can use ``memsvc.protocol`` without loading the daemon. Snapshots with regions kept in the service
(checkpoint_with_regions, restore_with_regions, read_regions) live in ``dynsnap_core.snapshot.regions``.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import MemsvcError  # noqa: F401

_WHERE = {"Client": "client", "Attachment": "client", "quiesce": "client", "resume": "client",
          "MemoryService": "service", "spawn": "service", "main": "service",
          "send_message": "protocol", "recv_message": "protocol"}
#: Names other code took from the one-module memsvc before the split (module, name there): the socket and peer
#: helpers both services share now live in dynsnap_core.unixsock.
_MOVED = {"_peer_cred": ("dynsnap_core.unixsock", "peer_cred"),
          "_peer_groups": ("dynsnap_core.unixsock", "peer_groups"),
          "_allowed_roots": ("dynsnap_core.unixsock", "allowed_roots")}

__all__ = ["MemsvcError", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    if name in _MOVED:
        mod, attr = _MOVED[name]
        return getattr(importlib.import_module(mod), attr)
    if name in ("protocol", "client", "service"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

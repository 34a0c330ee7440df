"""GPU memory service (GMS) and releasable GPU regions: weights and KV cache out of the snapshot.

- :mod:`.vmm`: thin typed wrappers over the CUDA driver's virtual memory management API (cuMem*).
- :mod:`.protocol`: the wire protocol (length-prefixed JSON over a Unix stream socket, fds by SCM_RIGHTS),
  request validation and the client.
- :mod:`.layout`: a weight set's tensor table inside one allocation and its layout hash.
- :mod:`.policy`: which unheld weight sets to free for a new one (LRU under a byte budget), a pure function.
- :mod:`.service`: ``dynsnap gms serve``: the long-lived process that owns the physical allocations.
- :mod:`.regions`: the worker side: VA reservations, weights mapped from the service, private regions.
- :mod:`.agent` / :mod:`.agent_client`: quiesce/resume of a worker over an abstract Unix socket.
- :mod:`.wiring`: the calls ``dynsnap checkpoint``/``restore`` make around the freeze (find, quiesce, record,
  make the weight sets resident beside CRIU's restore, resume).
- :mod:`.worker`: a torch model built on a service's weights, a KV pool in a private region.

Importing this package never needs a GPU, a driver or cuda-python.
"""
from __future__ import annotations

__all__ = ["vmm", "protocol", "layout", "policy", "service", "regions", "agent", "agent_client", "wiring", "worker"]

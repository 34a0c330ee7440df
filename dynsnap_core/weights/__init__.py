"""Weight sets: save a state dict or import .safetensors into a content-addressed store, verify, load into GPU or
host memory. ``dynsnap_core.weights.save/load/verify/...`` is the API.

Modules, bottom up: ``format`` (the manifest and dtype tables), ``verify``, ``safetensors`` (reading .safetensors),
``store`` (objects and sets on disk), ``device`` (the one GPU access point), ``loader`` (the load paths).
"""
from __future__ import annotations

from ..errors import (GpuUnavailable, PathUnavailable, ShardCorrupt, TensorMismatch,  # noqa: F401
                      WeightSetNotFound, WeightsError, WeightsOutOfMemory)
from .format import (ALIGN, DEFAULT_SHARD_BYTES, DTYPE_SIZES, FORMAT_VERSION, MAGIC, ShardEntry,  # noqa: F401
                     TensorEntry, WeightSet)
from .loader import Loaded, load  # noqa: F401
from .store import Store, import_safetensors, list_sets, open_set, save, verify  # noqa: F401

__all__ = [
    "MAGIC", "FORMAT_VERSION", "ALIGN", "DEFAULT_SHARD_BYTES", "DTYPE_SIZES", "WeightsError",
    "WeightSetNotFound", "ShardCorrupt", "TensorMismatch", "WeightsOutOfMemory", "GpuUnavailable",
    "PathUnavailable", "TensorEntry", "ShardEntry", "WeightSet", "Store", "save", "import_safetensors",
    "open_set", "verify", "list_sets", "load", "Loaded",
]

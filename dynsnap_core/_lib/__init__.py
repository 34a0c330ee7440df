"""Private compiled modules of dynsnap_core (_io: the C I/O engine, _memfd: memfd restoration and the region
digest, _h2d: the GPU weights pipeline, _cudaprobe: CUDA driver probe) and the one way to import them."""
from __future__ import annotations

import importlib
from types import ModuleType


def load(name: str, what: str) -> ModuleType:
    """The compiled module ``dynsnap_core._lib.<name>``; ImportError saying how to build it when it is missing."""
    try:
        return importlib.import_module(f"dynsnap_core._lib.{name}")
    except ImportError as exc:  # pragma: no cover - depends on how the package was installed
        raise ImportError(
            f"dynsnap_core's compiled {what} (dynsnap_core._lib.{name}) is missing: install the package "
            "(`pip install .`, or `pip install -e .` / `python setup.py build_ext --inplace` in a source tree)"
        ) from exc

"""Fixtures of the GPU suite: skip reasons (no driver, no GPU, no torch, no root, no CRIU) and the torch worker."""
from __future__ import annotations

import os
import shutil
import sys
from typing import Dict, List, Optional

import pytest

# The torch worker and its harness live in benches/ (bench_gpu.py drives the same worker).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benches"))
from gpu_harness import Worker, alive  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU and a driver with the checkpoint API")
    config.addinivalue_line("markers", "criu: needs a working CRIU (and root)")


def _gpu_skip_reason() -> Optional[str]:
    try:
        import dynsnap_core.cuda as cuda
    except Exception as exc:  # noqa: BLE001
        return f"dynsnap_core.cuda does not import: {exc}"
    if not cuda.is_available():
        return f"no usable CUDA checkpoint API: {cuda.driver_info()['reason']}"
    try:
        if not cuda.devices():
            return "the CUDA driver sees no GPU"
    except Exception as exc:  # noqa: BLE001
        return f"cannot list GPUs: {exc}"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (the GPU worker needs it)"
    return None


def _criu_path() -> Optional[str]:
    return os.environ.get("DYNSNAP_CRIU") or shutil.which("criu")


def _criu_skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "CRIU needs root"
    path = _criu_path()
    if not path or not os.access(path, os.X_OK):
        return "CRIU not found (set DYNSNAP_CRIU or put criu on PATH; scripts/gpu-check.sh does)"
    try:
        import dynsnap_core.cli  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"dynsnap_core.cli does not import (build the package first): {exc}"
    return None


_REASONS: Dict[str, Optional[str]] = {}


def _reason(kind: str) -> Optional[str]:
    if kind not in _REASONS:
        _REASONS[kind] = _gpu_skip_reason() if kind == "gpu" else _criu_skip_reason()
    return _REASONS[kind]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        reason = _reason("gpu")
        if reason is None and "criu" in item.keywords:
            reason = _reason("criu")
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def worker_factory(tmp_path):
    """``worker_factory(gb)`` starts a worker and waits until it is ready; all are killed and reaped after."""
    made: List[Worker] = []

    def make(gb: float = 1.0, seed: int = 1234) -> Worker:
        w = Worker(gb, str(tmp_path), seed)
        made.append(w)
        return w.wait_ready()

    yield make
    for w in made:
        # A test may have left it locked or checkpointed: bring it back before killing so the GPU is clean.
        try:
            import dynsnap_core.cuda as cuda
            if alive(w.pid):
                cuda.CudaTree([w.pid]).rollback()
        except Exception:  # noqa: BLE001
            pass
        try:
            w.kill()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture
def worker(worker_factory):
    return worker_factory(float(os.environ.get("DYNSNAP_GPU_TEST_GB", "2")))



"""Shared fixtures: a subreaper test runner, self-checking workloads that are always killed and reaped, the CLI."""
from __future__ import annotations

import os

import pytest

from helpers import ROOT, Workload, cli  # noqa: F401  (re-exported for tests)

# Test hooks (DYNSNAP_FAULT, DYNSNAP_MEMSVC_LOAD_DELAY) answer only with this set (dynsnap_core.config.test_hook);
# every process the tests start inherits it.
os.environ["DYNSNAP_TEST_HOOKS"] = "1"


def _criu_ok() -> str | None:
    if os.geteuid() != 0:
        return "CRIU tests need root"
    try:
        from dynsnap_core.criu import find_criu
        find_criu()
    except Exception as e:  # noqa: BLE001
        return f"no usable CRIU ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "criu" in item.keywords:
            if not checked:
                reason, checked = _criu_ok(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def subreaper():
    """CRIU-restored trees are re-parented: make the test runner adopt and reap them."""
    from dynsnap_core.proc import set_child_subreaper
    set_child_subreaper()
    yield


def pytest_generate_tests(metafunc):
    """Every test that takes ``engine`` runs once per I/O backend (dynsnap_core is imported only then)."""
    if "engine" in metafunc.fixturenames:
        from dynsnap_core.io import ENGINES
        metafunc.parametrize("engine", ENGINES, indirect=True)


@pytest.fixture
def engine(request) -> str:
    """An I/O backend name; the test is skipped where that backend cannot initialise."""
    from dynsnap_core._lib import _io
    rc = _io.probe(request.param)
    if rc:
        pytest.skip(f"engine {request.param} cannot initialise here: {os.strerror(-rc)}")
    return request.param


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("DYNSNAP_HOME", str(h))
    return h


@pytest.fixture
def workload(tmp_path):
    made: list[Workload] = []

    def start(*flags: str) -> Workload:
        w = Workload(tmp_path, *flags)
        made.append(w)
        return w
    yield start
    for w in made:
        w.kill()

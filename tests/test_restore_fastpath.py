"""restore -> first answer of a CPU worker of a few hundred MB (issue 12's CPU target): dynsnap's default restore
against `criu restore` of the same images, page cache warm and cold (the images evicted from it). pytest-benchmark
records every time and the test prints dynsnap's ratio to CRIU; no timing is asserted. Every round checks the
worker's answer and the SHA-256 of its whole memory against the snapshot's.

The worker's size: $DYNSNAP_FASTPATH_MB (default 256)."""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from helpers import PageWorker, gone, kill_proc

pytestmark = [pytest.mark.criu, pytest.mark.root, pytest.mark.timeout(300)]

MB = int(os.environ.get("DYNSNAP_FASTPATH_MB", "256"))
ROUNDS = 3
_medians: dict = {}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """One worker, snapshotted once (its own DYNSNAP_HOME); the original is gone, so each round restores its pid."""
    tmp = tmp_path_factory.mktemp("fastpath")
    mp = pytest.MonkeyPatch()
    mp.setenv("DYNSNAP_HOME", str(tmp / "home"))
    import dynsnap_core as ds
    w = PageWorker(tmp, MB)
    try:
        want = {"ping": w.ask("ping"), "sha": w.ask("sha")["sha256"]}
        snap = ds.checkpoint(w.pid, tmp / "snap")
        w.reap_original()
        yield w, snap, want
    finally:
        kill_proc(w.popen)
        gone(w.pid)
        mp.undo()


@pytest.mark.parametrize("cache, method", [("warm", "dynsnap"), ("warm", "criu"), ("cold", "dynsnap"),
                                           ("cold", "criu")])
def test_restore_to_first_answer(benchmark, snapshot, cache, method, capsys):
    from dynsnap_core.bench import util as benchutil
    from dynsnap_core.criu import find_criu
    from dynsnap_core.snapshot import restore
    w, snap, want = snapshot
    images = snap.path / "criu"
    criu = find_criu()
    state: dict = {}

    def setup():
        assert gone(w.pid), "the previous round's worker is still there"
        (benchutil.evict if cache == "cold" else benchutil.warm)([images])

    def target():
        if method == "dynsnap":
            state["restored"] = restore(snap.path)           # the default: verified, lazy where uffd works
        else:
            with tempfile.TemporaryDirectory(dir=snap.path.parent) as wd:
                criu.run(["restore", "-D", str(images), "-W", wd, "-d"], log=Path(wd) / "restore.log",
                         stage="restore")
        state["answer"] = w.ask("ping")

    def teardown():
        r = state.pop("restored", None)
        assert state.pop("answer") == want["ping"]
        assert w.ask("sha")["sha256"] == want["sha"]          # every byte of the memory, as snapshotted
        if r is not None:
            r.wait_filled(timeout=120)
            state["lazy"] = r.fill is not None
        os.kill(w.pid, signal.SIGKILL)
        assert gone(w.pid)

    benchmark.group = f"restore -> first answer, {MB} MiB worker, {cache} page cache"
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=ROUNDS)
    if method == "dynsnap":
        benchmark.extra_info["lazy"] = state.get("lazy")
    stats = getattr(benchmark, "stats", None)
    if stats is None:                                      # --benchmark-disable: nothing recorded
        return
    _medians[(cache, method)] = stats.stats.median
    other = _medians.get((cache, "criu" if method == "dynsnap" else "dynsnap"))
    if other is not None:
        dyn, base = (_medians[(cache, "dynsnap")], _medians[(cache, "criu")])
        benchmark.extra_info["dynsnap_speedup_vs_criu"] = base / dyn
        with capsys.disabled():
            print(f"\n{cache}: dynsnap default {dyn:.3f} s, criu restore {base:.3f} s -> dynsnap is "
                  f"{base / dyn:.2f}x as fast (median of {ROUNDS}, {MB} MiB worker)")

"""`dynsnap bench restore` at a tiny size: every method restores the worker and gets the same answer."""
from __future__ import annotations

import pytest

from dynsnap_core.bench import restore as bench_restore

pytestmark = pytest.mark.criu


def test_bench_restore_smoke(home):
    res = bench_restore.run(size_mb=16)
    methods = [(r["cache"], r["method"]) for r in res["rows"]]
    caches = ["cold", "cold-images", "warm"] if res["disk_read_gbps"] else ["cold-images", "warm"]
    assert methods == [(c, m) for c in caches for m in bench_restore.METHODS]
    assert all(r["ok"] for r in res["rows"]), res["rows"]
    assert all(r["first_answer_s"] >= r["restore_s"] > 0 for r in res["rows"])
    table = bench_restore.format_table(res)
    assert table.count("| yes |") == len(res["rows"])
    assert not list((home / "bench").iterdir()), "the benchmark removes its snapshot and worker files"


def test_restore_prefetch_tmpfs_checks_and_cleans(workload, tmp_path, home):
    import os
    import dynsnap_core as ds
    w = workload("--mem-mb", "32")
    before = w.request()
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    r = ds.restore(snap.path, prefetch="tmpfs")
    assert r.pid == w.pid and "prefetch" in r.timings
    after = w.request()
    assert after["mem"]["sha256"] == before["mem"]["sha256"]
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"dynsnap-restore-{os.getpid()}-")]
    with pytest.raises(ds.DynsnapError, match="unknown restore prefetch mode 'disk'"):
        ds.restore(snap.path, prefetch="disk")

"""Smoke test of dynsnap_core.bench.memfd at a tiny size: structure only, never timings."""
from __future__ import annotations

import json
import os

from dynsnap_core import memfd
from dynsnap_core.bench import memfd as bench_memfd
from helpers import cli


def test_bench_memfd_runs_small(tmp_path):
    steps = []
    r = bench_memfd.run(str(tmp_path), size_mb=16, threads="1,2", cold=False, repeats=1, progress=steps.append)
    json.dumps(r)
    assert {"date", "machine", "config", "rows", "limits", "notes"} <= set(r)
    assert r["machine"]["cpu_count"] == os.cpu_count()
    tools = {(row["mode"], row["tool"], row["threads"]) for row in r["rows"]}
    assert {("memory", "memcpy (populated)", 1), ("memory", "memcpy (populated)", 2),
            ("page cache", "pread loop, 1 thread (baseline)", 1), ("page cache", "dynsnap parallel fill", 1),
            ("page cache", "dynsnap parallel fill", 2)} <= tools
    assert {("memory", "memcpy into fresh memory (faults + copy)", 2),
            ("page cache", "copy only: pread into a populated memfd", 1),
            ("page cache", "copy only: pread into a populated memfd", 2)} <= tools
    for row in r["rows"]:
        assert row["gbps"] >= 0 and {"vs_baseline", "vs_memcpy", "vs_fresh_memcpy_same_threads", "cpu_s_per_gb",
                                     "pages", "pages_seen"} <= set(row)
    # huge page rows run when the kernel allows them, else they are listed as skipped with the command to run
    skipped = {s["tool"]: s for s in r["skipped"]}
    thp, huge = memfd.shmem_thp(), memfd.hugetlb_pages()
    has_thp = ("page cache", "dynsnap parallel fill, THP memfd", 2) in tools
    assert has_thp == thp["allowed"] != ("dynsnap parallel fill, THP memfd" in skipped)
    if not thp["allowed"]:
        assert skipped["dynsnap parallel fill, THP memfd"]["fix"] == \
            "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled"
    need = (16 << 20) // huge["page_size"]
    has_huge = ("page cache", "dynsnap parallel fill, hugetlb memfd", 2) in tools
    assert has_huge == (huge["available"] >= need) != ("dynsnap parallel fill, hugetlb memfd" in skipped)
    if not has_huge:
        assert skipped["dynsnap parallel fill, hugetlb memfd"]["fix"] == \
            f"sysctl -w vm.nr_hugepages={huge['total'] + need - huge['available']}"
    lim = r["limits"]
    has_thp_memcpy = ("memory", "memcpy (populated, THP)", 2) in tools
    assert has_thp_memcpy == thp["allowed"] == bool(lim["memcpy_thp_gbps_by_threads"])
    best = max([lim["memcpy_best_gbps"], *lim["memcpy_thp_gbps_by_threads"].values()])
    assert r["targets"]["memcpy_best_gbps"] == best and r["targets"]["memcpy_gbps"] == round(0.8 * best, 3)
    table = bench_memfd.format_table(r)
    assert all(f"skipped: {s['reason']}" in table for s in r["skipped"])
    assert steps and os.listdir(tmp_path) == []
    assert table.count("\n") >= len(r["rows"]) + len(r["skipped"]) + 2


def test_cli_bench_memfd_json(tmp_path):
    out = cli("bench", "memfd", "--json", "--size-mb", "8", "--threads", "1", "--no-cold", "--dir", tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["config"]["threads"] == [1]

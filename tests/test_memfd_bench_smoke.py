"""Smoke test of dynsnap_core.bench_memfd at a tiny size: structure only, never timings."""
from __future__ import annotations

import json
import os

from dynsnap_core import bench_memfd
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
    for row in r["rows"]:
        assert row["gbps"] >= 0 and {"vs_baseline", "vs_memcpy", "cpu_s_per_gb"} <= set(row)
    assert steps and os.listdir(tmp_path) == []
    assert bench_memfd.format_table(r).count("\n") >= len(r["rows"]) + 2


def test_cli_bench_memfd_json(tmp_path):
    out = cli("bench", "memfd", "--json", "--size-mb", "8", "--threads", "1", "--no-cold", "--dir", tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["config"]["threads"] == [1]

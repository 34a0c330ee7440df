"""Smoke test of dynsnap_core.bench.io at a tiny size: structure only, never timings."""
from __future__ import annotations

import json
import os

from dynsnap_core.bench import io as bench_io


def test_bench_io_runs_small(tmp_path):
    steps = []
    r = bench_io.run(str(tmp_path), size_mb=8, block_kb=256, qd=4, cold=False, progress=steps.append)
    json.dumps(r)
    assert {"date", "machine", "config", "rows", "notes"} <= set(r)
    assert r["machine"]["cpu_count"] == os.cpu_count() and r["machine"]["fs_type"]
    assert r["config"]["size_mb"] == 8
    ops = {(row["op"], row["tool"]) for row in r["rows"]}
    assert {("write", "dynsnap write_buffers"), ("read", "dynsnap hash_file"),
            ("copy", "dynsnap copy_tree"), ("copy", "cp"), ("copy", "shutil.copyfile")} <= ops
    for row in r["rows"]:
        assert {"op", "tool", "engine", "gbps", "seconds", "cpu_s_per_gb", "ratio_fio",
                "ratio_baseline", "note"} <= set(row)
        assert row["gbps"] >= 0
    assert steps
    assert os.listdir(tmp_path) == []
    table = bench_io.format_table(r)
    assert table.count("\n") >= len(r["rows"]) + 2
    if bench_io.find_fio():        # scripts/setup.sh installs fio: the device-limit rows, copy's included
        assert {("write", "fio"), ("read", "fio"), ("copy", "fio read || write")} <= ops
        limits = {}
        for row in r["rows"]:
            if row["tool"].startswith("fio"):
                limits[row["op"]] = max(limits.get(row["op"], 0.0), row["gbps"])
        serial = 1 / (1 / limits["read"] + 1 / limits["write"])
        for row in r["rows"]:
            assert row["ratio_fio"] == round(row["gbps"] / max(limits[row["op"]], serial if row["op"] == "copy"
                                                              else 0), 3)

"""The benchmark tables, rendered exactly: bench/util.py's row and table helpers, and the io and weights tables
built on them (a failed run, an empty cell, a sweep grid and the targets table included)."""
from __future__ import annotations

from dynsnap_core.bench import io as bench_io, weights as bench_weights
from dynsnap_core.bench.util import md_row, md_table, text_row


def test_md_table_rows_and_rule():
    assert md_row(["a", 1, ""]) == "| a | 1 |  |"
    assert md_table(("x", "y"), [(1, 2.5), ("", "z")]) == ["| x | y |", "|---|---|", "| 1 | 2.5 |", "|  | z |"]
    assert md_table(("only",)) == ["| only |", "|---|"]


def test_text_row_aligns_and_stops_at_the_last_cell():
    assert text_row(["1.2", "warm", "7.50", "ok"], [">6", "<5", ">7", ""]) == "   1.2 warm     7.50 ok"
    assert text_row(["16", "FAILED: x"], [">6", ">7", ">7"]) == "    16 FAILED: x"


def test_io_table_with_empty_cells_and_sweep():
    res = {"date": "2026-11-30", "machine": {"cpu_count": 2, "kernel": "6.1", "fs_type": "ext4", "dir": "/tmp"},
           "config": {"size_mb": 64, "block_kb": 1024, "queue_depth": 32, "cold": True},
           "rows": [{"op": "copy", "tool": "dynsnap", "engine": "psync", "gbps": 1.234, "ratio_fio": None,
                     "ratio_baseline": 2.5, "cpu_s_per_gb": 0.12, "note": ""}],
           "notes": ["a"],
           "sweep": {"engine": "io_uring", "size_mb": 64,
                     "cells": [{"qd": 1, "block_kb": 1024, "write_gbps": 1, "read_gbps": 2},
                               {"qd": 8, "block_kb": 1024, "write_gbps": 1.5, "read_gbps": 2.5},
                               {"qd": 1, "block_kb": 4096, "write_gbps": 3, "read_gbps": 4}]}}
    assert bench_io.format_table(res).splitlines() == [
        "2026-11-30: 2 CPUs, Linux 6.1, ext4 at /tmp; 64 MiB, 1024 KiB blocks, QD 32, cold cache",
        "",
        "| op | tool | engine | GB/s | vs fio | vs baseline | CPU s/GB | note |",
        "|---|---|---|---|---|---|---|---|",
        "| copy | dynsnap | psync | 1.23 |  | 2.50 | 0.12 |  |",
        "- a",
        "",
        "sweep (io_uring, 64 MiB, O_DIRECT, cold): GB/s write / read (write_buffers / hash_file)",
        "",
        "| block \\ QD | 1 | 8 |",
        "|---|---|---|",
        "| 1 MiB | 1.00 / 2.00 | 1.50 / 2.50 |",
        "| 4 MiB | 3.00 / 4.00 |  |",
    ]


WEIGHTS = {"date": "2026-11-30", "machine": {"gpu": "H200", "cpus": 16, "kernel": "6.1", "torch": "2.4", "kvikio": "24"},
           "config": {"threads": 8, "chunk": 64 << 20, "nbuf": 2},
           "limits": {"h2d_pinned_gbps": 50.0, "disk_odirect_gbps": None, "pagecache_gbps": 20.5},
           "rows": [{"size_gb": 1.2, "cache": "warm", "method": "dynsnap pipeline", "seconds": 0.2, "gbps": 6.0,
                     "cpu_seconds": 1.0, "bit_exact": False, "x_safetensors": 7.5, "pct_of_limit": 93.2,
                     "limit_gbps": 6.4},
                    {"size_gb": 1.2, "cache": "warm", "method": "kvikio defaults", "error": "x" * 120},
                    {"size_gb": 1.2, "cache": "warm", "method": "dynsnap kvikio (tuned)", "seconds": 10.0, "gbps": 1.6,
                     "cpu_seconds": 12.34, "bit_exact": None}],
           "save": [{"size_gb": 1.2, "seconds": 20.0, "gbps": 0.8, "shards": 4}]}


def test_weights_text_table():
    lines = bench_weights.format_table(WEIGHTS).splitlines()
    assert lines[3:] == [
        "== table ==",
        "  size cache method                               s    GB/s  x sft  %limit  cpu s ok",
        "   1.2 warm  dynsnap pipeline                  0.20    6.00   7.50     93%    1.0 NO",
        "   1.2 warm  kvikio defaults                FAILED: " + "x" * 80,
        "   1.2 warm  dynsnap kvikio (tuned)           10.00    1.60      -       -   12.3 -",
        "save 1.2 GB into the store: 20.0 s (0.80 GB/s, 4 shards)",
    ]


def test_weights_markdown_with_a_failed_row_and_targets():
    lines = bench_weights.format_markdown(WEIGHTS).splitlines()
    assert lines[4:] == [
        "| size GB | cache | method | s | GB/s | x safetensors | % of limit | CPU s | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 1.2 | warm | dynsnap pipeline | 0.20 | 6.00 | 7.50 | 93% | 1.0 | **NO** |",
        "| 1.2 | warm | kvikio defaults | FAILED: " + "x" * 100 + " | | | | | |",
        "| 1.2 | warm | dynsnap kvikio (tuned) | 10.00 | 1.60 | - | - | 12.3 | - |",
        "",
        "| target | met | measured |",
        "|---|---|---|",
        "| 1.2 GB warm pipeline >= 4x safetensors | yes | 6.00 GB/s = 7.50x |",
        "| 1.2 GB warm pipeline >= 90% of min(page cache -> pinned, H2D) | yes | 93% of 6.40 GB/s |",
    ]

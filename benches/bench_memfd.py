"""pytest-benchmark: parallel memfd fill vs a single-threaded pread loop, 64 MiB from the page cache (pytest benches/)."""
from __future__ import annotations

import os

import pytest

from dynsnap_core.bench import memfd as bench_memfd

SIZE = 64 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-memfd") / "image"
    path.write_bytes(os.urandom(SIZE))
    return str(path)


@pytest.mark.parametrize("threads", bench_memfd.thread_counts())
def test_parallel_fill(benchmark, image, threads):
    benchmark.pedantic(lambda: bench_memfd._fill(image, SIZE, threads), rounds=5)
    benchmark.extra_info["bytes"] = SIZE


def test_pread_loop_baseline(benchmark, image):
    benchmark.pedantic(lambda: bench_memfd._pread_loop(image, SIZE), rounds=5)
    benchmark.extra_info["bytes"] = SIZE

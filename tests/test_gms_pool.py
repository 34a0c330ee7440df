"""The torch pool allocator (bindings/gms/gms_pool.c) through ctypes: bump allocation over a range, limits, reuse, threads.

The allocator only hands out addresses (it never touches memory), so it is tested here without a GPU with a
range that is never dereferenced; tests/gpu/test_gpu_gms.py runs it under torch on a real PrivateRegion.
"""
from __future__ import annotations

import threading

import pytest

from dynsnap_core.gms.regions import pool_lib, pool_stats

pytestmark = pytest.mark.timeout(60)

BASE = 0x7F0000000000
EBUSY, EINVAL = 16, 22


@pytest.fixture
def lib():
    lib = pool_lib()
    assert lib.gms_pool_clear() == 0
    yield lib
    assert pool_stats()["live"] == 0, "a test left allocations live"
    lib.gms_pool_clear()


def test_bump_allocation_alignment_and_exhaustion(lib):
    assert lib.gms_pool_set(BASE, 1 << 20, 0) == 0
    a = lib.gms_pool_alloc(1, 0, None)
    b = lib.gms_pool_alloc(1000, 0, None)
    c = lib.gms_pool_alloc(512, 0, None)
    assert (a, b, c) == (BASE, BASE + 512, BASE + 512 + 1024)
    assert lib.gms_pool_alloc(1 << 20, 0, None) is None          # more than is left
    assert lib.gms_pool_alloc(16, 1, None) is None               # another device
    assert lib.gms_pool_alloc(0, 0, None) is None
    assert pool_stats() == {"base": BASE, "size": 1 << 20, "used": 2048, "live": 3}
    rest = lib.gms_pool_alloc((1 << 20) - 2048, 0, None)
    assert rest == BASE + 2048 and lib.gms_pool_alloc(1, 0, None) is None
    for p, n in ((a, 1), (b, 1000), (c, 512)):
        lib.gms_pool_free(p, n, 0, None)
    assert pool_stats()["used"] == 1 << 20                       # reused only once everything is freed
    lib.gms_pool_free(rest, 0, 0, None)
    assert pool_stats() == {"base": BASE, "size": 1 << 20, "used": 0, "live": 0}
    assert lib.gms_pool_alloc(4096, 0, None) == BASE
    lib.gms_pool_free(BASE, 4096, 0, None)


def test_frees_outside_the_range_are_ignored(lib):
    assert lib.gms_pool_set(BASE, 1 << 20, 0) == 0
    p = lib.gms_pool_alloc(100, 0, None)
    lib.gms_pool_free(BASE + (1 << 20), 100, 0, None)
    lib.gms_pool_free(0x1000, 100, 0, None)
    assert pool_stats()["live"] == 1
    lib.gms_pool_free(p, 100, 0, None)


def test_one_range_at_a_time_while_allocations_live(lib):
    assert lib.gms_pool_set(BASE, 1 << 20, 0) == 0
    p = lib.gms_pool_alloc(100, 0, None)
    assert lib.gms_pool_set(BASE + (1 << 30), 1 << 20, 0) == -EBUSY
    assert lib.gms_pool_set(BASE, 1 << 20, 0) == 0               # the same range again: fine, nothing reset
    assert pool_stats()["used"] == 512
    assert lib.gms_pool_clear() == -EBUSY
    lib.gms_pool_free(p, 100, 0, None)
    assert lib.gms_pool_set(BASE + (1 << 30), 1 << 20, 0) == 0
    assert lib.gms_pool_clear() == 0 and pool_stats()["base"] == 0
    assert lib.gms_pool_alloc(100, 0, None) is None              # no range: nothing to hand out


@pytest.mark.parametrize("base,size", [(0, 1 << 20), (BASE, 0), (BASE + 1, 1 << 20)])
def test_bad_ranges_are_refused(lib, base, size):
    assert lib.gms_pool_set(base, size, 0) == -EINVAL


def test_concurrent_allocations_are_distinct(lib):
    n_threads, per = 8, 500
    assert lib.gms_pool_set(BASE, n_threads * per * 512, 0) == 0
    got: list[list[int]] = [[] for _ in range(n_threads)]

    def work(i: int) -> None:
        for _ in range(per):
            got[i].append(lib.gms_pool_alloc(300, 0, None))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    flat = [p for g in got for p in g]
    assert None not in flat and len(set(flat)) == n_threads * per
    assert sorted(flat) == [BASE + 512 * k for k in range(n_threads * per)]
    for p in flat:
        lib.gms_pool_free(p, 300, 0, None)

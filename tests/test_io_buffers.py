"""dynsnap_core.io read_into and write_buffers with bytearray, memoryview, mmap and array buffers, every backend."""
from __future__ import annotations

import array
import mmap
import os

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynsnap_core import io
from dynsnap_core._lib import _io

SIZES = [0, 1, 4095, 4096, 4097, (1 << 20) + 3, 2 * (1 << 20) + 4097]


@pytest.mark.parametrize("size", SIZES)
def test_write_then_read(engine, tmp_path, size):
    data = os.urandom(size)
    parts = [data[: size // 3], memoryview(data)[size // 3: size // 2], bytearray(data[size // 2:])]
    r = io.write_buffers(tmp_path / "f", parts, engine=engine)
    assert r.size == size and r.xxh3 == xxhash.xxh3_64_hexdigest(data)
    assert (tmp_path / "f").read_bytes() == data

    buf = bytearray(size + 17)
    assert io.read_into(tmp_path / "f", buf, 17, engine=engine) == size
    assert bytes(buf[17:]) == data

    # page-aligned target: O_DIRECT head plus buffered tail
    with mmap.mmap(-1, max(size, 1) + 4096) as m:
        assert io.read_into(tmp_path / "f", m, 0, engine=engine) == size
        assert m[:size] == data
        assert io.read_into(tmp_path / "f", memoryview(m)[4096:], engine=engine) == size
        assert m[4096:4096 + size] == data


def test_typed_buffers(engine, tmp_path):
    a = array.array("d", [float(i) / 3 for i in range(10000)])
    r = io.write_buffers(tmp_path / "a", [a, b"tail"], engine=engine)
    raw = a.tobytes() + b"tail"
    assert r.xxh3 == xxhash.xxh3_64_hexdigest(raw)
    b = array.array("d", [0.0] * 10001)
    assert io.read_into(tmp_path / "a", b, engine=engine) == len(raw)
    assert b.tobytes()[: len(raw)] == raw


def test_read_into_too_small(engine, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    with pytest.raises(OSError) as ei:
        io.read_into(tmp_path / "f", bytearray(99), engine=engine)
    assert ei.value.errno == __import__("errno").EOVERFLOW
    assert str(tmp_path / "f") in str(ei.value)
    with pytest.raises(ValueError):
        io.read_into(tmp_path / "f", bytearray(100), 101, engine=engine)


def test_read_into_readonly_buffer(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(BufferError):
        io.read_into(tmp_path / "f", b"immutable")


def test_write_buffers_replaces(engine, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 10000)
    io.write_buffers(tmp_path / "f", [b"short"], engine=engine, fsync=False)
    assert (tmp_path / "f").read_bytes() == b"short"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.integers(0, 70_000), max_size=6), offset=st.integers(0, 5000),
       eng=st.sampled_from(io.ENGINES))
def test_buffers_property(tmp_path, chunks, offset, eng):
    if _io.probe(eng):
        return
    parts = [bytes((i + n) & 0xFF for i in range(n)) for n in chunks]
    data = b"".join(parts)
    r = io.write_buffers(tmp_path / "p", parts, engine=eng, fsync=False)
    assert r.size == len(data) and r.xxh3 == xxhash.xxh3_64_hexdigest(data)
    buf = bytearray(offset + len(data))
    assert io.read_into(tmp_path / "p", buf, offset, engine=eng) == len(data)
    assert bytes(buf[offset:]) == data


def _aligned(n: int, fill: bytes) -> memoryview:
    """A page-aligned writable buffer of n bytes (an anonymous mapping) holding fill[:n]."""
    m = mmap.mmap(-1, max(n, 1))
    m[:n] = fill[:n]
    return memoryview(m)[:n]


@pytest.mark.parametrize("layout", ["unaligned", "aligned", "mixed", "aligned-after-odd"])
@pytest.mark.parametrize("block_size,queue_depth", [(None, None), (65536, 2), (4096, 1)])
def test_write_direct_layouts(engine, tmp_path, layout, block_size, queue_depth):
    """The O_DIRECT write path: zero-copy aligned pieces, staged unaligned ones, odd tails; hash-compared."""
    data = os.urandom(3 * (1 << 20) + 12345)
    if layout == "unaligned":
        parts = [memoryview(bytearray(b"\0" + data))[1:]]
    elif layout == "aligned":
        parts = [_aligned(len(data), data)]
    elif layout == "mixed":
        cut = [0, 4096, 4096 + 17, 1 << 20, (1 << 20) + 8192, 2 * (1 << 20) + 1, len(data)]
        # odd pieces page-aligned in memory, even ones plain bytes
        parts = [_aligned(cut[i + 1] - cut[i], data[cut[i]:cut[i + 1]]) if i % 2 else data[cut[i]:cut[i + 1]]
                 for i in range(len(cut) - 1)]
    else:  # aligned memory that lands at an unaligned file offset
        parts = [data[:100], _aligned(len(data) - 100, data[100:])]
    backend, size, h, direct = _io.write_buffers(str(tmp_path / "d"), parts, engine=engine,
                                                 block_size=block_size, queue_depth=queue_depth)
    assert backend == engine and size == len(data) and h == xxhash.xxh3_64_intdigest(data)
    assert (tmp_path / "d").stat().st_size == len(data)
    assert xxhash.xxh3_64_hexdigest((tmp_path / "d").read_bytes()) == xxhash.xxh3_64_hexdigest(data)
    if _fs(tmp_path) in ("ext4", "xfs", "btrfs"):
        assert direct


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 8191, 65537])
def test_write_direct_odd_sizes(engine, tmp_path, size):
    data = os.urandom(size)
    for parts in ([data], [_aligned(size, data)], [data[:1], data[1:]]):
        backend, n, h, _direct = _io.write_buffers(str(tmp_path / "o"), parts, engine=engine, block_size=8192,
                                                   queue_depth=3)
        assert n == size and h == xxhash.xxh3_64_intdigest(data)
        assert (tmp_path / "o").read_bytes() == data
    r = io.write_buffers(tmp_path / "b", [data], engine=engine, direct=False)
    assert r.xxh3 == xxhash.xxh3_64_hexdigest(data) and (tmp_path / "b").read_bytes() == data


def _fs(path) -> str:
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            p = line.split()
            if str(path).startswith(p[1]) and len(p[1]) > len(best):
                best, fstype = p[1], p[2]
    return fstype

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


@pytest.fixture(params=io.ENGINES)
def engine(request) -> str:
    rc = _io.probe(request.param)
    if rc:
        pytest.skip(f"engine {request.param} cannot initialise here: {os.strerror(-rc)}")
    return request.param


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

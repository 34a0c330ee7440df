"""memfd restoration from Python: parallel fill, digests, views, seal, dump, bad input, fds passed to a real process."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsnap_core import memfd
from dynsnap_core.errors import SnapshotCorrupt

MiB = 1 << 20


def ref_digest(data: bytes) -> str:
    """The region digest written out with the xxhash package: independent of the C code."""
    h = xxhash.xxh3_64(seed=len(data))
    for off in range(0, len(data), memfd.HASH_CHUNK):
        h.update(struct.pack("<Q", xxhash.xxh3_64_intdigest(data[off:off + memfd.HASH_CHUNK])))
    return h.hexdigest()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("memfd") / "image"
    data = os.urandom(19 * MiB + 4321)
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("threads", [1, 2, 4, 16])
@pytest.mark.parametrize("opts", [{}, {"direct": True}, {"thp": True, "populate": False}, {"seal": True}])
def test_restore_content_and_digest(image, threads, opts):
    path, data = image
    before = open_fds()
    segs = [memfd.Segment(str(path), name="whole"), memfd.Segment(str(path), 4096, 10 * MiB, name="mid"),
            (str(path), 999, 3 * MiB + 7)]
    got = memfd.restore(segs, threads=threads, **opts)
    try:
        for m, (off, n) in zip(got, [(0, len(data)), (4096, 10 * MiB), (999, 3 * MiB + 7)]):
            assert m.size == n
            assert bytes(m.view()) == data[off:off + n]
            assert m.digest == ref_digest(data[off:off + n]) == memfd.digest(data[off:off + n], threads=1)
            assert m.sealed == bool(opts.get("seal"))
        assert got[0].name == "whole"
        assert "/memfd:whole" in os.readlink(f"/proc/self/fd/{got[0].fd}")
    finally:
        for m in got:
            m.close()
    assert open_fds() == before


@settings(max_examples=25, deadline=None)
@given(off=st.integers(0, 3 * MiB), n=st.integers(0, 3 * MiB), threads=st.integers(1, 5))
def test_restore_any_offset_and_length(image, off, n, threads):
    path, data = image
    [m] = memfd.restore([memfd.Segment(str(path), off, n, digest=ref_digest(data[off:off + n]))], threads)
    with m:
        assert bytes(m.view()) == data[off:off + n]


def test_digest_parallel_equals_reference():
    data = os.urandom(3 * memfd.HASH_CHUNK + 5)
    assert memfd.digest(data, threads=4) == memfd.digest(data, threads=1) == ref_digest(data)
    assert memfd.digest(b"") == ref_digest(b"")


def test_copy_with_threads():
    src = os.urandom(9 * MiB + 3)
    dst = bytearray(len(src))
    memfd.copy(dst, src, threads=3)
    assert dst == src
    with pytest.raises(ValueError):
        memfd.copy(bytearray(3), b"1234")


def test_sealed_region_refuses_writes(image):
    path, _ = image
    [m] = memfd.restore([(str(path), 0, MiB)], seal=True)
    with m:
        with pytest.raises(PermissionError):
            m.view(writable=True)
        v = m.view()
        assert v.readonly


def test_segment_beyond_end_of_file(image):
    path, data = image
    before = open_fds()
    with pytest.raises(SnapshotCorrupt, match="beyond the end of the file") as ei:
        memfd.restore([(str(path), 0, MiB), (str(path), len(data) - 10, 11)])
    assert ei.value.path == str(path)
    assert open_fds() == before


def test_checksum_mismatch_hands_out_nothing(image):
    path, data = image
    before = open_fds()
    bad = ref_digest(data[:MiB] + b"x")
    with pytest.raises(SnapshotCorrupt, match="checksum mismatch"):
        memfd.restore([memfd.Segment(str(path), 0, MiB, digest=ref_digest(data[:MiB])),
                       memfd.Segment(str(path), 0, MiB, digest=bad)])
    assert open_fds() == before


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        memfd.restore([(str(tmp_path / "nope"), 0, 10)])


def test_hugetlb_clear_error_or_works(image):
    path, _ = image
    try:
        got = memfd.restore([(str(path), 0, 3 * MiB)], hugetlb=True)
    except memfd.MemfdError as e:
        assert "hugetlb" in str(e) or e.errno in (12, 22)
        return
    for m in got:
        assert m.hugetlb and m.map_size % (2 * MiB) == 0
        m.close()


def test_dump_and_restore_back(tmp_path):
    regions = []
    for i, n in enumerate([12 * MiB + 5, 4096, 0]):
        m = memfd.create(n, f"r{i}")
        if n:
            m.view()[:] = os.urandom(n)
        regions.append(m)
    paths = [tmp_path / f"r{i}" for i in range(3)]
    res = memfd.dump(regions, paths, threads=3)
    for m, r, p in zip(regions, res, paths):
        assert r.size == m.size == p.stat().st_size
        assert r.digest == ref_digest(p.read_bytes())
    back = memfd.restore([memfd.Segment(str(p), digest=r.digest) for p, r in zip(paths, res)])
    for a, b in zip(regions, back):
        assert bytes(a.view()) == bytes(b.view())
        b.close()
    with pytest.raises(FileExistsError):
        memfd.dump(regions[:1], paths[:1])
    for m in regions:
        m.close()


RECEIVER = r"""
import hashlib, socket, sys
from dynsnap_core import memfd
s = socket.socket(fileno=int(sys.argv[1]))
m, msg = memfd.MemFd.receive(s)
print(msg["tag"], m.name, m.size, m.digest, m.compute_digest(), hashlib.sha256(m.view()).hexdigest(), flush=True)
"""


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_STREAM])
def test_send_to_another_process(image, kind):
    path, data = image
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b:
        child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(b.fileno())], pass_fds=[b.fileno()],
                                 stdout=subprocess.PIPE, text=True)
        [m] = memfd.restore([(str(path), 0, 5 * MiB)], seal=True)
        with m:
            m.send(a, {"tag": "hello"})
        out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    tag, name, size, dig, recomputed, sha = out.split()
    assert (tag, name, int(size)) == ("hello", "image", 5 * MiB)
    assert dig == recomputed == ref_digest(data[:5 * MiB])
    assert sha == hashlib.sha256(data[:5 * MiB]).hexdigest()


def test_reserve_attach_detach_same_address(image):
    path, data = image
    [m] = memfd.restore([(str(path), 0, 4 * MiB)])
    addr = memfd.reserve(4 * MiB)
    try:
        memfd.attach(m.fd, addr, 4 * MiB, writable=True)
        v = memfd.view_at(addr, 4 * MiB)
        assert bytes(v[:100]) == data[:100]
        v.release()
        memfd.detach(addr, 4 * MiB)
        with open("/proc/self/maps") as f:
            maps = f.read()
        assert "/memfd:image" not in maps
        memfd.attach(m.fd, addr, 4 * MiB)
        assert memfd.digest(memfd.view_at(addr, 4 * MiB)) == m.digest
    finally:
        memfd.release(addr, 4 * MiB)
        m.close()


def test_counters_balance(image):
    path, _ = image
    c0 = memfd.debug_counters()
    for m in memfd.restore([(str(path), 0, MiB), (str(path), MiB, MiB)], threads=2):
        m.close()
    c = memfd.debug_counters()
    d = {k: c[k] - c0[k] for k in c}
    assert d["maps_created"] == d["maps_freed"] and d["fds_opened"] == d["fds_closed"]
    assert d["threads_started"] == d["threads_joined"]
    assert d["memfd_objects_opened"] == d["memfd_objects_closed"] == d["memfds_created"] == 2

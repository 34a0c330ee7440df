"""dynsnap_core.io copy_tree/copy_file/hash_file on real files, every backend, checked against python xxhash."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynsnap_core import io
from dynsnap_core._lib import _io

SIZES = [0, 1, 4095, 4096, 4097, (1 << 20) + 3, 3 * (1 << 20) + 4097, 5 * (1 << 20) - 1]


def fs_type(path: str) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", path], capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def ext4_dir(tmp_path):
    """A directory on a disk file system that supports O_DIRECT (the repo's ext4 if /tmp is not)."""
    if fs_type(str(tmp_path)) in ("ext4", "xfs", "btrfs"):
        yield tmp_path
        return
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".test-io-tmp")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, os.path.basename(str(tmp_path)))
    os.makedirs(path)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="dynsnap-test-")
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def accepts_direct(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def make_file(path, size: int, seed: int = 0) -> bytes:
    data = os.urandom(size) if seed == 0 else bytes((i * seed + 7) & 0xFF for i in range(size))
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_copy_tree_sizes(engine, ext4_dir, direct):
    src, dst = ext4_dir / "src", ext4_dir / "dst"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    data = {}
    for i, size in enumerate(SIZES):
        rel = os.path.join("sub", "deeper" if i % 2 else "", f"f{i}")
        data[os.path.normpath(rel)] = make_file(src / rel, size)
    seen = []
    res = io.copy_tree(src, dst, engine=engine, direct=direct, block_size=256 * 1024,
                       progress=lambda done, total: seen.append((done, total)))
    assert res.engine == engine
    assert res.bytes == sum(map(len, data.values()))
    assert res.direct is direct  # ext4 takes O_DIRECT
    assert (dst / "empty").is_dir()
    assert sorted(f.path for f in res.files) == sorted(data)
    for f in res.files:
        content = (dst / f.path).read_bytes()
        assert content == data[f.path]
        assert f.size == len(content)
        assert f.xxh3 == xxhash.xxh3_64_hexdigest(content)
        assert io.hash_file(dst / f.path, engine=engine, direct=direct).xxh3 == f.xxh3
    assert seen and seen[-1] == (res.bytes, res.bytes)
    assert res.gbps > 0


def test_copy_file_tmpfs_falls_back(engine, shm_dir):
    data = make_file(shm_dir / "a", 3 * (1 << 20) + 5)
    r = io.copy_file(shm_dir / "a", shm_dir / "b", engine=engine, direct=True)
    assert (shm_dir / "b").read_bytes() == data
    assert r == io.FileResult("b", len(data), xxhash.xxh3_64_hexdigest(data))
    res = io.copy_tree(shm_dir, str(shm_dir) + "-copy", engine=engine, direct=True)
    try:
        # tmpfs refused O_DIRECT before Linux 6.6 (buffered fallback) and accepts it since
        assert res.direct is accepts_direct(shm_dir / "a")
        assert {f.path for f in res.files} == {"a", "b"}
    finally:
        shutil.rmtree(str(shm_dir) + "-copy")


def test_copy_without_checksum_or_fsync(engine, ext4_dir):
    data = make_file(ext4_dir / "a", 100_000)
    r = io.copy_file(ext4_dir / "a", ext4_dir / "b", engine=engine, checksum=False, fsync=False)
    assert r.xxh3 == "" and r.size == len(data)
    assert (ext4_dir / "b").read_bytes() == data


def test_many_small_files_keep_queue_full(engine, ext4_dir):
    src = ext4_dir / "src"
    src.mkdir()
    data = {f"f{i:03d}": make_file(src / f"f{i:03d}", (i * 997) % 20000, seed=i + 1) for i in range(150)}
    res = io.copy_tree(src, ext4_dir / "dst", engine=engine, queue_depth=8, block_size=4096)
    assert len(res.files) == 150
    for f in res.files:
        assert f.xxh3 == xxhash.xxh3_64_hexdigest(data[f.path])
        assert (ext4_dir / "dst" / f.path).read_bytes() == data[f.path]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_default_blocks_huge_page_pool(engine, ext4_dir, direct):
    """Default 4 MiB blocks: the pool is >= 2 MiB, 2 MiB-aligned and madvised for huge pages."""
    src = ext4_dir / "src"
    src.mkdir()
    sizes = SIZES + [(4 << 20) - 1, 4 << 20, (4 << 20) + 1, 9 * (1 << 20) + 4097]
    sizes += [(i * 65537) % 300_000 for i in range(24)]
    data = {f"f{i:03d}": make_file(src / f"f{i:03d}", size) for i, size in enumerate(sizes)}
    res = io.copy_tree(src, ext4_dir / "dst", engine=engine, direct=direct, queue_depth=4)
    assert res.bytes == sum(map(len, data.values())) and len(res.files) == len(data)
    for f in res.files:
        content = (ext4_dir / "dst" / f.path).read_bytes()
        assert content == data[f.path]
        assert f.xxh3 == xxhash.xxh3_64_hexdigest(content)
        assert io.hash_file(ext4_dir / "dst" / f.path, engine=engine, direct=direct).xxh3 == f.xxh3


def test_empty_tree_and_empty_dst_dir(engine, ext4_dir):
    (ext4_dir / "src").mkdir()
    (ext4_dir / "dst").mkdir()
    res = io.copy_tree(ext4_dir / "src", ext4_dir / "dst", engine=engine)
    assert res.files == [] and res.bytes == 0


def test_auto_reports_first_available(ext4_dir):
    make_file(ext4_dir / "a", 10)
    (ext4_dir / "t").mkdir()
    make_file(ext4_dir / "t" / "x", 10)
    res = io.copy_tree(ext4_dir / "t", ext4_dir / "u")
    assert res.engine == io.available_engines()[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 300_000), block_kb=st.sampled_from([4, 8, 12, 64, 128]),
       qd=st.integers(1, 9), direct=st.booleans(), eng=st.sampled_from(io.ENGINES))
def test_roundtrip_property(ext4_dir, size, block_kb, qd, direct, eng):
    if _io.probe(eng):
        return
    src, dst = ext4_dir / f"p-{size}-{block_kb}-{qd}", ext4_dir / f"q-{size}-{block_kb}-{qd}-{direct}-{eng}"
    data = make_file(src, size, seed=size % 251 + 1)
    r = io.copy_file(src, dst, engine=eng, direct=direct, block_size=block_kb * 1024, queue_depth=qd)
    assert dst.read_bytes() == data
    assert r.xxh3 == xxhash.xxh3_64_hexdigest(data)
    h = _io.hash_file(str(dst), engine=eng, direct=direct, block_size=block_kb * 1024, queue_depth=qd)
    assert h[1] == size and f"{h[2]:016x}" == r.xxh3
    os.unlink(src)
    os.unlink(dst)


@pytest.mark.slow
def test_one_gib_odd_size(ext4_dir):
    size = (1 << 30) + 12345
    src = ext4_dir / "big"
    h = xxhash.xxh3_64()
    chunk = os.urandom(1 << 20)
    with open(src, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            h.update(chunk[:n])
            left -= n
    r = io.copy_file(src, ext4_dir / "big2")
    assert r.size == size and r.xxh3 == h.hexdigest()
    assert io.hash_file(ext4_dir / "big2").xxh3 == h.hexdigest()

"""dynsnap_core.io failures: ENOSPC, missing source, existing destination, truncated source, leaks."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from dynsnap_core import io
from dynsnap_core._lib import _io


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted in a temporary directory (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_enospc_copy(engine, tmp_path, small_tmpfs):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(6 << 20))
    dst = small_tmpfs / "dst"
    with pytest.raises(OSError) as ei:
        io.copy_tree(src, dst, engine=engine)
    assert ei.value.errno == errno.ENOSPC
    assert str(dst / "big") in str(ei.value)
    assert not dst.exists()
    with pytest.raises(OSError) as ei:
        io.copy_file(src / "big", small_tmpfs / "one", engine=engine)
    assert ei.value.errno == errno.ENOSPC and "one" in str(ei.value)
    assert os.listdir(small_tmpfs) == []


@pytest.mark.root
def test_enospc_write_buffers(engine, small_tmpfs):
    with pytest.raises(OSError) as ei:
        io.write_buffers(small_tmpfs / "w", [os.urandom(3 << 20), os.urandom(3 << 20)], engine=engine)
    assert ei.value.errno == errno.ENOSPC
    assert str(small_tmpfs / "w") in str(ei.value)
    assert not (small_tmpfs / "w").exists()


def test_source_missing(engine, tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        io.copy_file(tmp_path / "nope", tmp_path / "dst", engine=engine)
    assert "nope" in str(ei.value)
    assert not (tmp_path / "dst").exists()
    with pytest.raises(FileNotFoundError):
        io.copy_tree(tmp_path / "nope", tmp_path / "dst", engine=engine)
    with pytest.raises(FileNotFoundError):
        io.hash_file(tmp_path / "nope", engine=engine)
    with pytest.raises(FileNotFoundError):
        io.read_into(tmp_path / "nope", bytearray(1), engine=engine)


def test_destination_exists(engine, tmp_path):
    (tmp_path / "a").write_bytes(b"new")
    (tmp_path / "b").write_bytes(b"old")
    with pytest.raises(FileExistsError) as ei:
        io.copy_file(tmp_path / "a", tmp_path / "b", engine=engine)
    assert str(tmp_path / "b") in str(ei.value)
    assert (tmp_path / "b").read_bytes() == b"old"
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"x")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_bytes(b"k")
    with pytest.raises(FileExistsError):
        io.copy_tree(src, dst, engine=engine)
    assert os.listdir(dst) == ["keep"]


def test_symlink_and_special_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    os.symlink("f", src / "link")
    with pytest.raises(OSError) as ei:
        io.copy_tree(src, tmp_path / "dst")
    assert ei.value.errno == errno.EINVAL and "symbolic link" in str(ei.value)
    assert not (tmp_path / "dst").exists()
    os.unlink(src / "link")
    os.mkfifo(src / "fifo")
    with pytest.raises(OSError, match="special file"):
        io.copy_tree(src, tmp_path / "dst")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_source_truncated_while_reading(engine, tmp_path, direct):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 << 20))
    calls = []

    def shrink(done, total):
        if not calls:
            os.truncate(src, 8192)
        calls.append(done)

    with pytest.raises(OSError) as ei:
        _io.copy_files([str(src)], [str(tmp_path / "dst")], engine=engine, direct=direct,
                       block_size=65536, queue_depth=4, progress=shrink, progress_ms=0)
    assert ei.value.errno == errno.EIO
    assert "truncated while reading" in str(ei.value) and str(src) in str(ei.value)
    assert not (tmp_path / "dst").exists()


def test_progress_exception_aborts(engine, tmp_path):
    (tmp_path / "src").write_bytes(os.urandom(1 << 20))

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _io.copy_files([str(tmp_path / "src")], [str(tmp_path / "dst")], engine=engine,
                       block_size=65536, queue_depth=2, progress=boom, progress_ms=0)
    assert not (tmp_path / "dst").exists()


def test_bad_arguments(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown engine"):
        io.copy_file(tmp_path / "a", tmp_path / "b", engine="nope")
    with pytest.raises(ValueError, match="block_size"):
        io.copy_file(tmp_path / "a", tmp_path / "b", block_size=1000)
    with pytest.raises(ValueError):
        io.copy_file(tmp_path / "a", tmp_path / "b", queue_depth=100000)


def test_no_leaks_after_many_operations(tmp_path):
    """Rings, buffers, registrations and fds balance after successes and failures; fd count is flat."""
    (tmp_path / "a").write_bytes(os.urandom(300_000))
    before = _io.debug_counters()
    nfd = len(os.listdir("/proc/self/fd"))
    for i in range(10):
        for eng in io.available_engines():
            io.copy_file(tmp_path / "a", tmp_path / f"b{i}{eng}", engine=eng, block_size=65536)
            io.hash_file(tmp_path / f"b{i}{eng}", engine=eng)
            io.read_into(tmp_path / "a", bytearray(300_000), engine=eng)
            io.write_buffers(tmp_path / "w", [b"x" * 1000], engine=eng, fsync=False)
            for bad in (lambda: io.copy_file(tmp_path / "a", tmp_path / "a", engine=eng),
                        lambda: io.copy_file(tmp_path / "zz", tmp_path / "z", engine=eng),
                        lambda: io.read_into(tmp_path / "a", bytearray(10), engine=eng)):
                with pytest.raises(OSError):
                    bad()
    after = _io.debug_counters()
    assert len(os.listdir("/proc/self/fd")) == nfd
    delta = {k: after[k] - before[k] for k in after}
    assert delta["rings_created"] == delta["rings_freed"] > 0
    assert delta["buffers_created"] == delta["buffers_freed"] > 0
    assert delta["registered_created"] == delta["registered_freed"]
    assert delta["fds_opened"] == delta["fds_closed"] > 0
    threads = os.listdir("/proc/self/task")
    names = []
    for t in threads:
        with open(f"/proc/self/task/{t}/comm") as f:
            names.append(f.read().strip())
    assert not [n for n in names if n.startswith("iou-")], names

"""memfd page kinds: THP (default when the kernel allows shmem THP) and hugetlb restores give the exact content.

Expectations are computed from /sys and /proc here, never mocked. As root, two tests switch a host setting on
for their own duration (shmem THP for 2 MiB pages, a few hugetlb pages) and put the old value back.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path

import pytest

from dynsnap_core import memfd

MiB = 1 << 20
THP = Path("/sys/kernel/mm/transparent_hugepage")
ON = ("always", "within_size", "advise", "force")


def _sel(path: Path):
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else text.strip()


def _shmem_thp_allowed() -> bool:
    top, pmd = _sel(THP / "shmem_enabled"), _sel(THP / "hugepages-2048kB" / "shmem_enabled")
    return top is not None and top != "deny" and (top in ON or (pmd or "inherit") in ON)


def _meminfo() -> dict:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) if v.split() else 0
    return out


@contextlib.contextmanager
def _host_setting(path: Path, value: str):
    """Write ``value`` to a sysfs/procfs file for the duration (root only), then put the old value back."""
    old = _sel(path)
    try:
        path.write_text(value)
    except OSError as e:                  # a read-only /proc/sys or /sys (an unprivileged container)
        pytest.skip(f"cannot set {path} for this test: {e.strerror}")
    try:
        yield
    finally:
        path.write_text(old)


@pytest.fixture
def hugetlb_reserved(image):
    """Enough free hugetlb pages for the image: reserved for this test when there are none, released after."""
    mi = _meminfo()
    page = mi["Hugepagesize"] << 10
    need = -(-len(image[1]) // page)
    free = mi["HugePages_Free"] - mi["HugePages_Rsvd"]
    if free >= need:
        yield need
        return
    want = mi["HugePages_Total"] + need - free
    if os.geteuid() != 0:
        pytest.skip(f"hugetlb: {free} free {mi['Hugepagesize']} kB pages, {need} needed "
                    f"(sysctl -w vm.nr_hugepages={want} to run this)")
    with _host_setting(Path("/proc/sys/vm/nr_hugepages"), str(want)):
        if _meminfo()["HugePages_Total"] < want:
            pytest.skip(f"hugetlb: the kernel found no room for {need} more {mi['Hugepagesize']} kB pages")
        yield need


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("pages") / "image"
    data = os.urandom(9 * MiB + 777)       # 4 whole 2 MiB blocks and a tail
    path.write_bytes(data)
    return path, data


def test_sysfs_and_meminfo_readers():
    t, h, mi = memfd.shmem_thp(), memfd.hugetlb_pages(), _meminfo()
    assert t["shmem_enabled"] == _sel(THP / "shmem_enabled")
    assert t["pmd_shmem_enabled"] == _sel(THP / "hugepages-2048kB" / "shmem_enabled")
    assert t["allowed"] == _shmem_thp_allowed()
    assert h == {"page_size": mi["Hugepagesize"] << 10, "total": mi["HugePages_Total"], "free": mi["HugePages_Free"],
                 "reserved": mi["HugePages_Rsvd"], "available": max(0, mi["HugePages_Free"] - mi["HugePages_Rsvd"])}


@pytest.mark.parametrize("thp", [None, True, False])
def test_thp_restore_exact_content(image, thp):
    path, data = image
    allowed = _shmem_thp_allowed()
    got = memfd.restore([memfd.Segment(str(path), name="thp"), (str(path), 4096 + 5, 5 * MiB)], threads=2, thp=thp)
    try:
        for m, (off, n) in zip(got, [(0, len(data)), (4096 + 5, 5 * MiB)]):
            assert m.thp == (allowed if thp is None else thp) and not m.hugetlb
            assert m.size == m.map_size == n
            assert hashlib.sha256(m.view()).digest() == hashlib.sha256(data[off:off + n]).digest()
            assert m.digest == memfd.digest(data[off:off + n], threads=1) == m.compute_digest()
        kind = got[0].page_kind()
        if not (got[0].thp and allowed):
            assert kind == "4k" and got[0].huge_bytes() == 0
        else:   # the kernel falls back to small pages when it finds no free 2 MiB block
            assert kind in ("thp", "mixed") and 0 < got[0].huge_bytes() <= 8 * MiB
    finally:
        for m in got:
            m.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching shmem THP on for the test needs root")
def test_thp_pages_when_the_kernel_allows_them(image):
    """With shmem THP allowed for 2 MiB pages (advise), the default restore gets huge pages, thp=False does not."""
    knob = THP / "hugepages-2048kB" / "shmem_enabled"
    if not knob.exists() or _sel(THP / "shmem_enabled") == "deny":
        pytest.skip("this kernel has no per-size shmem THP setting (or THP is denied)")
    path, data = image
    with _host_setting(knob, "advise"):
        assert memfd.shmem_thp()["allowed"]
        seg = memfd.Segment(str(path), name="thp")
        on, off = memfd.restore([seg], threads=2)[0], memfd.restore([seg], threads=2, thp=False)[0]
        with on, off:
            assert on.thp and not off.thp
            assert hashlib.sha256(on.view()).digest() == hashlib.sha256(off.view()).digest() == \
                hashlib.sha256(data).digest()
            assert off.page_kind() == "4k" and off.huge_bytes() == 0
            assert on.page_kind() in ("thp", "mixed") and 0 < on.huge_bytes() <= 8 * MiB


def test_page_probe_allocates_nothing():
    with memfd.create(8 * MiB, "holes") as m:
        assert m.page_kind() == "4k" and m.huge_bytes() == 0
        with pytest.raises(OSError) as ei:
            os.lseek(m.fd, 0, os.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO      # still all holes


def test_hugetlb_restore_exact_content(image, tmp_path, hugetlb_reserved):
    path, data = image
    mi = _meminfo()
    page = mi["Hugepagesize"] << 10
    need = hugetlb_reserved
    [m] = memfd.restore([memfd.Segment(str(path), name="huge")], threads=2, hugetlb=True)
    with m:
        assert m.hugetlb and not m.thp and m.size == len(data) and m.map_size == need * page
        assert hashlib.sha256(m.view()).digest() == hashlib.sha256(data).digest()
        assert m.digest == memfd.digest(data, threads=1) == m.compute_digest()
        assert m.page_kind() == "hugetlb"
        [d] = memfd.dump([m], [tmp_path / "back"], threads=2)
        assert d.size == len(data) and d.digest == m.digest
        assert hashlib.sha256((tmp_path / "back").read_bytes()).digest() == hashlib.sha256(data).digest()
    # every page back in the pool: views map whole huge pages, so close() really unmaps them
    assert _meminfo()["HugePages_Free"] == mi["HugePages_Free"]


def test_hugetlb_without_pages_says_so(image):
    path, data = image
    mi = _meminfo()
    if mi["HugePages_Free"] - mi["HugePages_Rsvd"] >= -(-len(data) // (mi["Hugepagesize"] << 10)):
        pytest.skip("this machine has enough free hugetlb pages")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(memfd.MemfdError, match=r"no free hugetlb pages .*vm\.nr_hugepages"):
        memfd.restore([(str(path), 0, len(data))], hugetlb=True)
    assert set(os.listdir("/proc/self/fd")) == before

"""The host's huge page settings, read live: transparent huge pages (sysfs switches, shmem THP for memfds) and
the hugetlb pool. ``memfd`` picks its page kind from them, ``thp_scope`` switches THP for a restore, ``doctor``
reports them."""
from __future__ import annotations

from typing import Optional

__all__ = ["THP_DIR", "sysfs_selected", "shmem_thp", "hugetlb_pages"]


THP_DIR = "/sys/kernel/mm/transparent_hugepage"


_THP_ON = ("always", "within_size", "advise", "force")


def sysfs_selected(path: str) -> Optional[str]:
    """The bracketed choice of a sysfs switch (``always [advise] never`` -> ``advise``); None if absent."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    if "[" in text and "]" in text:
        return text.split("[", 1)[1].split("]", 1)[0]
    return text.strip() or None


def shmem_thp() -> dict:
    """Whether a memfd mapping advised MADV_HUGEPAGE gets PMD-sized transparent huge pages, read live from sysfs.

    Returns ``{"shmem_enabled": ..., "pmd_shmem_enabled": ..., "pmd_kb": ..., "allowed": bool}``:
    ``shmem_enabled`` is the host-wide switch (None: no THP in this kernel), ``pmd_shmem_enabled`` the
    ``hugepages-<pmd_kb>kB/shmem_enabled`` knob (``inherit`` follows the host-wide one; None on kernels
    without it). 'deny' turns huge pages off everywhere, 'force' on everywhere.
    """
    top = sysfs_selected(f"{THP_DIR}/shmem_enabled")
    try:
        with open(f"{THP_DIR}/hpage_pmd_size") as f:
            pmd_kb = int(f.read()) >> 10
    except (OSError, ValueError):
        pmd_kb = 2048
    per = sysfs_selected(f"{THP_DIR}/hugepages-{pmd_kb}kB/shmem_enabled")
    allowed = top is not None and top != "deny" and (top in _THP_ON or (per or "inherit") in _THP_ON)
    return {"shmem_enabled": top, "pmd_shmem_enabled": per, "pmd_kb": pmd_kb, "allowed": bool(allowed)}


def hugetlb_pages() -> dict:
    """The default-size hugetlb pool from /proc/meminfo: ``page_size`` (bytes), ``total``, ``free``,
    ``reserved`` and ``available`` (= free - reserved: what a new MFD_HUGETLB mapping can still reserve)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k] = int(v.split()[0]) if v.split() else 0
    except (OSError, ValueError):
        pass
    total, free, rsvd = info.get("HugePages_Total", 0), info.get("HugePages_Free", 0), info.get("HugePages_Rsvd", 0)
    return {"page_size": info.get("Hugepagesize", 2048) << 10, "total": total, "free": free, "reserved": rsvd,
            "available": max(0, free - rsvd)}

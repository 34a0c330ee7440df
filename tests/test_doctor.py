"""dynsnap doctor: every row present, verdicts match what this machine really has."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import cli

ROWS = ["kernel", "CONFIG_CHECKPOINT_RESTORE", "privilege", "criu", "io engines", "memfd", "huge pages",
        "userfaultfd", "cuda driver"]


def _rows(r):
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    return data, {c["name"]: c for c in data["checks"]}


def test_doctor_json_rows_and_verdicts():
    from dynsnap_core import cuda, io
    data, rows = _rows(cli("doctor", "--json"))
    names = [c["name"] for c in data["checks"]]
    assert names[:len(ROWS)] == ROWS and names[-1] == "kvikio/GDS"
    assert all(c["status"] in ("ok", "missing", "warn", "info") for c in data["checks"])
    assert rows["kernel"]["detail"].startswith(f"Linux {os.uname().release}")
    assert rows["io engines"]["detail"].startswith("usable: " + ", ".join(io.available_engines()))
    if os.geteuid() == 0:
        assert rows["privilege"] == {"name": "privilege", "status": "ok", "detail": "running as root", "fix": None}
        assert rows["criu"]["status"] == "ok" and "version 4." in rows["criu"]["detail"]
    if not cuda.is_available():
        assert rows["cuda driver"]["status"] == "missing"
        assert cuda.driver_info()["reason"] in rows["cuda driver"]["detail"]
        assert data["ok"] is False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_doctor_without_privilege(tmp_path):
    data, rows = _rows(cli("doctor", "--json", user=65534))
    assert rows["privilege"]["status"] == "missing"
    assert rows["privilege"]["fix"] == "run dynsnap as root (sudo) or grant CAP_CHECKPOINT_RESTORE"


def test_doctor_table():
    r = cli("doctor")
    assert r.returncode == 0
    first = [line.split()[0] for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert first[:3] == ["kernel", "CONFIG_CHECKPOINT_RESTORE", "privilege"]


def _sel(path):
    """The bracketed choice of a sysfs switch, or None when the file is absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else text.strip()


def _meminfo():
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) if v.split() else 0
    return out


def test_doctor_memfd_and_huge_page_rows():
    """shmem THP verdict and hugetlb pool as this kernel reports them right now (no setting is changed)."""
    thp = "/sys/kernel/mm/transparent_hugepage"
    top, pmd = _sel(f"{thp}/shmem_enabled"), _sel(f"{thp}/hugepages-2048kB/shmem_enabled")
    mi = _meminfo()
    _, rows = _rows(cli("doctor", "--json"))
    mem, huge = rows["memfd"], rows["huge pages"]
    on = ("always", "within_size", "advise", "force")
    if top is None:
        assert mem["status"] == "info" and "no transparent huge pages" in mem["detail"]
    else:
        allowed = top != "deny" and (top in on or (pmd or "inherit") in on)
        knobs = f"shmem THP '{top}' (hugepages-2048kB: '{pmd or 'n/a'}')"
        if allowed:
            assert mem == {"name": "memfd", "status": "ok", "fix": None,
                           "detail": f"memfd_create ok; {knobs}: memfd fill uses 2 MiB pages"}
        else:
            assert mem["status"] == "info"
            assert mem["detail"] == (f"memfd_create ok; {knobs}: memfd fill uses 4 KiB pages (slow to allocate "
                                     "from many threads)")
            assert mem["fix"].startswith(f"echo advise > {thp}/shmem_enabled ")
    free = max(0, mi["HugePages_Free"] - mi["HugePages_Rsvd"])
    pool = f"hugetlb memfd: {free} of {mi['HugePages_Total']} {mi['Hugepagesize']} kB pages free"
    try:
        os.close(os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_HUGETLB))
        assert pool in huge["detail"]
    except OSError:
        assert "no hugetlb memfd" in huge["detail"]
    anon = _sel(f"{thp}/enabled")
    assert huge["status"] == ("ok" if anon == "always" else "info")
    if anon != "always":
        assert "sysctl -w vm.nr_hugepages=N" in huge["fix"]
        if anon is not None:
            assert huge["fix"].startswith(f"echo always > {thp}/enabled")

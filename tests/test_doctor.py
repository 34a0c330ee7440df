"""dynsnap doctor: every row present, verdicts match what this machine really has."""
from __future__ import annotations

import json
import os

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

"""restore --thp: the host's transparent huge pages are `always` while CRIU restores and come back afterwards,
also after a dynsnap that held them was killed; the restored worker's memory is in 2 MiB pages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dynsnap_core import thp_scope
from dynsnap_core.proc import reap_children
from helpers import cli

pytestmark = pytest.mark.criu

KNOB = thp_scope.ENABLED


@pytest.fixture
def thp_knob(tmp_path, monkeypatch):
    """The real host switch, set to 'madvise' for the test and put back after; a private run dir for the records."""
    if thp_scope.current() is None or not os.access(KNOB, os.W_OK):
        pytest.skip(f"{KNOB} is missing or not writable here: no transparent huge pages to scope")
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    old = thp_scope.current()
    KNOB.write_text("madvise")
    yield
    KNOB.write_text(old)


def _anon_huge_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("AnonHugePages:"))


def test_restore_with_thp_gives_huge_pages_and_puts_the_mode_back(thp_knob, workload, tmp_path, home):
    w = workload("--mem-mb", "64")
    before = w.request()
    snap = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", snap)
    assert r.returncode == 0, r.stderr
    w.reap_original()
    r = cli("restore", snap, "--json", "--thp")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    pid = out["pid"]
    try:
        assert out["timings"]["thp_always"] == 1.0
        assert thp_scope.current() == "madvise"                   # put back once CRIU was done
        assert not (tmp_path / "run" / "thp" / "saved").exists()
        assert _anon_huge_kb(pid) >= 32 << 10                      # most of the 64 MiB state in 2 MiB pages
        assert w.request()["mem"] == before["mem"]
    finally:
        os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            reap_children()
            time.sleep(0.01)


def test_scopes_nest_and_a_dead_holder_is_recovered(thp_knob, tmp_path):
    with thp_scope.ThpScope() as a:
        assert a.active and thp_scope.current() == "always"
        with thp_scope.ThpScope() as b:
            assert b.active
        assert thp_scope.current() == "always"                    # the outer restore still holds it
    assert thp_scope.current() == "madvise"
    # a dynsnap killed while it held the switch: its record stays, the next command puts the mode back
    holder = subprocess.Popen([sys.executable, "-c", "from dynsnap_core import thp_scope\n"
                               "s = thp_scope.ThpScope().__enter__()\nprint(s.active, flush=True)\n"
                               "import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert holder.stdout.readline().strip() == "True" and thp_scope.current() == "always"
    assert cli("list").returncode == 0 and thp_scope.current() == "always"   # its holder is alive: kept
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    r = cli("list")
    assert r.returncode == 0, r.stderr
    assert thp_scope.current() == "madvise" and not (tmp_path / "run" / "thp" / "saved").exists()


def test_bad_thp_setting_is_one_sentence(tmp_path, home):
    r = cli("restore", tmp_path / "nothing", env={"DYNSNAP_RESTORE_THP": "yes"})
    assert (r.returncode, r.stderr) == (1, "dynsnap restore: DYNSNAP_RESTORE_THP='yes': use 'always' or 'off'\n")

"""Restore never lets CRIU run on bytes that failed verification, bounds CRIU, and leaves nothing behind on any exit.

The damage is the issue's reproducer: one pagemap entry's page count raised by one (CRIU then loops in its
restorer, logging ~35 MB/s). Verified, it never reaches CRIU; re-sealed by a hostile editor (checksums and root
digest recomputed), CRIU is stopped by the log or time bound, by a pages file failing verification, by Ctrl-C,
SIGTERM or a SIGKILL of dynsnap; in every case no CRIU and no half-restored process survives.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from criu_images import pagemap, raise_nr_pages, reseal
from helpers import ROOT, cli, fail_line as one_line, wait_until

pytestmark = [pytest.mark.criu, pytest.mark.timeout(180)]


def criu_processes(snapshot: Path) -> list[int]:
    """Processes (CRIU, its supervisor) whose command line names this snapshot's images."""
    found = []
    needle = str(snapshot / "criu").encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(d))
        except OSError:
            pass
    return found


def gone(pid: int) -> bool:
    from dynsnap_core.proc import exists
    return not exists(pid)



def assert_nothing_left(snapshot: Path, pid: int) -> None:
    assert wait_until(lambda: not criu_processes(snapshot), 20), f"CRIU left running: {criu_processes(snapshot)}"
    assert wait_until(lambda: gone(pid), 20), f"half-restored pid {pid} left behind"


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """These tests make CRIU loop while it copies pages in, which only an eager restore does (a lazy one leaves the
    pages to its daemon and fails at once; tests/test_lazy_pages_restore.py covers that)."""
    monkeypatch.setenv("DYNSNAP_RESTORE_LAZY", "off")


@pytest.fixture
def snapshot(workload, tmp_path, home):
    w = workload("--mem-mb", "8")
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", out)
    assert r.returncode == 0, r.stderr
    w.reap_original()
    return w, out


def test_raised_page_count_is_refused_before_criu_starts(snapshot, home):
    """The issue's reproducer: verification names the pagemap; CRIU never ran (no restore log was even made)."""
    w, out = snapshot
    pm = pagemap(out)
    raise_nr_pages(pm, 0)
    r = cli("restore", out, timeout=60)
    assert one_line(r, "restore").startswith(f"{pm} does not match its checksum")
    assert_nothing_left(out, w.pid)
    assert not list((home / "logs").glob("restore-*/restore.log"))


def test_looping_criu_is_stopped_by_its_log_bound(snapshot, home):
    """Damage that passes verification (re-sealed): CRIU loops; dynsnap stops it at the log bound, trims the log,
    and kills the half-restored process."""
    w, out = snapshot
    raise_nr_pages(pagemap(out), 0)
    reseal(out, pagemap(out))
    assert cli("verify", out).returncode == 0
    r = cli("restore", out, env={"DYNSNAP_CRIU_LOG_LIMIT_MB": "8"}, timeout=120)
    msg = one_line(r, "restore")
    assert msg.startswith("CRIU restore was stopped: it wrote more than 8 MiB of log (it loops, most likely on "
                          f"damaged images) (log: {home}/logs/restore-"), msg
    log = Path(msg.split("(log: ")[1].rstrip(")"))
    assert log.stat().st_size <= (2 << 20) + 200 and b"dynsnap cut" in log.read_bytes()
    assert_nothing_left(out, w.pid)


def test_looping_criu_is_stopped_by_its_time_bound(snapshot):
    w, out = snapshot
    raise_nr_pages(pagemap(out), 0)
    reseal(out, pagemap(out))
    r = cli("restore", out, env={"DYNSNAP_CRIU_TIMEOUT": "2", "DYNSNAP_CRIU_LOG_LIMIT_MB": "100000"}, timeout=120)
    assert one_line(r, "restore").startswith("CRIU restore was stopped: it did not finish within 2 s (log: ")
    assert_nothing_left(out, w.pid)


def test_pages_failing_verification_stop_criu_at_once(workload, tmp_path, home):
    """CRIU loops on a re-sealed pagemap while the pages file, too large to check before CRIU starts, fails its
    checksum: CRIU is stopped by that failure, long before any bound."""
    w = workload("--mem-mb", "96")
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0, "checkpoint"
    w.reap_original()
    raise_nr_pages(pagemap(out), 0)
    reseal(out, pagemap(out))
    pages = max((out / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size - 4096)
        f.write(b"\xff" * 4096)
    r = cli("restore", out, env={"DYNSNAP_CRIU_TIMEOUT": "100", "DYNSNAP_CRIU_LOG_LIMIT_MB": "100000"}, timeout=120)
    assert one_line(r, "restore").startswith(f"{pages} does not match its checksum")
    assert_nothing_left(out, w.pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["Ctrl-C", "SIGTERM", "SIGKILL"])
def test_signal_during_restore_leaves_nothing(sig, snapshot, home):
    """Ctrl-C (to the whole job), SIGTERM, or a SIGKILL of dynsnap while CRIU loops: CRIU and the half-restored
    process die with the restore."""
    w, out = snapshot
    raise_nr_pages(pagemap(out), 0)
    reseal(out, pagemap(out))
    p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "restore", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "DYNSNAP_CRIU_TIMEOUT": "100", "DYNSNAP_CRIU_LOG_LIMIT_MB": "100000"})
    try:
        # CRIU is looping once the restored process exists and its log keeps growing
        assert wait_until(lambda: not gone(w.pid) and any(
            log.stat().st_size > 1 << 20 for log in (home / "logs").glob("restore-*/restore.log")), 60)
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:
        lines = [ln for ln in err.splitlines() if not ln.startswith("  ")]
        assert p.returncode == 1 and lines == [f"dynsnap restore: restore interrupted by {sig.name}; nothing was restored "
                                               "(CRIU and the half-restored processes were killed)"], err
    assert_nothing_left(out, w.pid)


@pytest.mark.parametrize("with_criu", [False, True], ids=["dynsnap+supervisor", "dynsnap+supervisor+CRIU"])
def test_restore_killed_with_its_supervisor(with_criu, snapshot, home, tmp_path, monkeypatch):
    """dynsnap and its supervisor SIGKILLed together while CRIU loops (a kill of the whole group): the supervisor's
    journal entry names every process below it, and the next dynsnap command kills exactly those."""
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    from dynsnap_core.proc import tree
    w, out = snapshot
    raise_nr_pages(pagemap(out), 0)
    reseal(out, pagemap(out))
    p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "restore", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, "DYNSNAP_CRIU_TIMEOUT": "100", "DYNSNAP_CRIU_LOG_LIMIT_MB": "100000"})
    try:
        assert wait_until(lambda: not gone(w.pid) and any(
            log.stat().st_size > 1 << 20 for log in (home / "logs").glob("restore-*/restore.log")), 60)
        assert wait_until(lambda: any(str(w.pid) in e.read_text() for e in (tmp_path / "run" / "restoring").glob(
            "*.json")), 10), "the supervisor records the half-restored process"
        everyone = tree(p.pid)
        sup = [x for x in everyone if b"supervise.py" in Path(f"/proc/{x}/cmdline").read_bytes()]
        criu = [x for x in everyone if x not in sup and x != p.pid and x != w.pid and b"criu" in Path(
            f"/proc/{x}/cmdline").read_bytes()]
        victims = [p.pid, *sup, *(criu if with_criu else [])]
        for x in victims:
            os.kill(x, signal.SIGSTOP)
        for x in victims:
            os.kill(x, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    time.sleep(0.3)
    assert not gone(w.pid), "nobody is left to clean up: the half-restored process is still there"
    r = cli("list", "--root", tmp_path / "none")
    assert r.returncode == 0, r.stderr
    assert_nothing_left(out, w.pid)
    assert list((tmp_path / "run" / "restoring").glob("*.json")) == []

"""No worker stays frozen: dynsnap, its guardian and CRIU killed together (a cgroup kill) leave a journal entry that the
next dynsnap command resumes; a worker its user had stopped stays stopped; stale staging is swept by every command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, cli, fail_line, wait_until

pytestmark = [pytest.mark.criu, pytest.mark.timeout(180)]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(d))
    return d


def kill_together(pid: int) -> list[int]:
    """SIGSTOP then SIGKILL dynsnap and all its descendants (guardian, CRIU) at once, as a cgroup kill does."""
    from dynsnap_core.proc import tree
    victims = tree(pid)
    for p in victims:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    victims = sorted(set(victims) | set(tree(pid)))
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def test_dynsnap_guardian_and_criu_killed_together(workload, tmp_path, home, run_dir):
    """The issue's reproducer: the tree is frozen (CRIU's dump done, persist running), then dynsnap, its guardian
    and anything of theirs die at once. The worker stays stopped until the next dynsnap command, which continues it."""
    w = workload("--mem-mb", "300")
    before = w.request()
    p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "checkpoint", "--pid", str(w.pid), "--out",
                          str(tmp_path / "s")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "DYNSNAP_STAGING": "target"})
    try:
        # frozen: CRIU's dump is done (the tree is left stopped) and the images are being persisted
        assert wait_until(lambda: w.state() == "T" and (run_dir / "frozen").is_dir() and any(
            (run_dir / "frozen").glob("*.json")), 60, 0.01), "the tree was never frozen"
        victims = kill_together(p.pid)
    finally:
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    entries = list((run_dir / "frozen").glob("*.json"))
    from dynsnap_core.proc import exists
    assert wait_until(lambda: not any(exists(v) for v in victims), 10, 0.01)      # SIGKILLed processes take a moment
    assert entries, "the frozen tree must be on record"
    time.sleep(0.5)
    assert w.state() == "T", "nobody else may continue it: its guardian is dead too"
    r = cli("list", "--root", tmp_path / "nothing")
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: w.state() != "T", 10, 0.01), "the next dynsnap command must continue the worker"
    after = w.request()
    assert after["all_ok"] and after["counter"] == before["counter"] + 1
    assert list((run_dir / "frozen").glob("*.json")) == []
    assert not [x for x in tmp_path.iterdir() if "staging" in x.name], "stale staging is swept by that command too"


def test_journal_entry_is_resumed_only_once_its_owner_is_gone(workload, run_dir):
    """The journal on its own: a stopped tree on record is continued by recover() once the recorded owner has died,
    and never while it lives; a pid the user had stopped is not in the entry's resume list and stays stopped."""
    from dynsnap_core import journal
    w1, w2 = workload(), workload()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(w1.pid, signal.SIGSTOP)
        os.kill(w2.pid, signal.SIGSTOP)
        code = ("import sys, os; from dynsnap_core.journal import Entry; "
                "e = Entry([int(sys.argv[1]), int(sys.argv[2])], [int(sys.argv[1])]); print(e.path)")
        # the entry is written by a process that then exits (it plays the killed dynsnap)
        r = subprocess.run([sys.executable, "-c", code, str(w1.pid), str(w2.pid)], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        entry = Path(r.stdout.strip())
        assert json.loads(entry.read_text())["resume"] == [w1.pid]
        # an entry whose owner is alive is left alone
        live = run_dir / "frozen" / "live.json"
        data = json.loads(entry.read_text())
        from dynsnap_core.proc import start_time
        data["owner"] = [owner.pid, start_time(owner.pid)]
        live.write_text(json.dumps(data))
        assert journal.recover() == [w1.pid]
        assert w1.state() != "T" and w2.state() == "T", "the user's SIGSTOP is respected"
        assert not entry.exists() and live.exists()
        owner.kill()
        owner.wait()
        assert journal.recover() == [w1.pid] and not live.exists()
    finally:
        owner.kill()
        owner.wait()
        os.kill(w2.pid, signal.SIGCONT)


def test_leave_running_respects_a_users_sigstop(workload, tmp_path, home, run_dir):
    w = workload()
    os.kill(w.pid, signal.SIGSTOP)
    assert wait_until(lambda: w.state() == "T", 60, 0.01)
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", "--leave-running")
    assert r.returncode == 0, r.stderr
    assert f"note: pid(s) {w.pid} were stopped before the checkpoint and stay stopped" in r.stderr
    time.sleep(0.3)
    assert w.state() == "T", "the user stopped it; dynsnap must not continue it"
    # a failed checkpoint rolls back to the same: still stopped
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s2", env={"DYNSNAP_FAULT": "dump"})
    assert fail_line(r, "checkpoint").startswith(f"CRIU dump of pid {w.pid} failed")
    time.sleep(0.3)
    assert w.state() == "T"
    os.kill(w.pid, signal.SIGCONT)
    assert w.request()["all_ok"]


def test_every_command_sweeps_stale_tmpfs_staging(tmp_path):
    """Staging of a killed run in /dev/shm (pid gone, or reused: the start time differs) is removed by any
    command, restore and inspect included; a live run's staging and foreign files are left alone."""
    from dynsnap_core.proc import start_time
    shm = tmp_path / "shm"
    shm.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [shm / f"dynsnap-dump-{dead.pid}.123-abc", shm / f"dynsnap-restore-{os.getpid()}.1-abc",
             shm / f"dynsnap-dump-{dead.pid}-old"]
    live = shm / f"dynsnap-dump-{os.getpid()}.{start_time(os.getpid())}-abc"
    foreign = shm / "dynsnap-dump-notes.txt"
    for d in stale + [live]:
        d.mkdir()
        (d / "pages-1.img").write_bytes(b"x" * 4096)
    foreign.write_text("not ours")
    r = cli("inspect", tmp_path / "missing", env={"DYNSNAP_TMPFS": str(shm)})
    assert r.returncode == 1
    assert sorted(p.name for p in shm.iterdir()) == sorted([live.name, foreign.name])

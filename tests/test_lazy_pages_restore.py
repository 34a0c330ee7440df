"""Lazy restore (dynsnap_core/lazy_pages.py) on real processes with real CRIU and userfaultfd: every byte right while
pages are still being filled, writes during the fill kept, a dead fill daemon never leaves a tree with holes, a
damaged snapshot never runs, the choice of mode and its errors."""
from __future__ import annotations

import json
import os
import signal

import pytest

from helpers import PageWorker, cli, gone, kill_proc, wait_until

pytestmark = [pytest.mark.criu, pytest.mark.root, pytest.mark.timeout(240)]


@pytest.fixture
def page_worker(tmp_path):
    made: list = []

    def start(mb: int) -> PageWorker:
        w = PageWorker(tmp_path, mb)
        made.append(w)
        return w
    yield start
    from dynsnap_core.proc import exists
    for w in made:
        kill_proc(w.popen)
        if exists(w.pid):                 # the restored copy (same pid, not our child)
            os.kill(w.pid, signal.SIGKILL)
        gone(w.pid)


def _criu_children() -> list[int]:
    """CRIU processes (restore or lazy-pages daemons) whose parent chain leads to this test run."""
    from dynsnap_core import proc
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and proc.comm(int(d)) == "criu":
            p = int(d)
            while p > 1:
                p = proc.parent(p) or 0
                if p == me:
                    out.append(int(d))
                    break
    return out


def test_every_byte_right_while_pages_are_filled(page_worker, tmp_path, home, monkeypatch):
    """The worker checks all its pages in a shuffled order and writes into some while CRIU's daemon is still
    filling its memory (no verification: the tree runs as early as it can); every CRC matches, the writes stay,
    and the daemon served faults (its log says so)."""
    import dynsnap_core as ds
    monkeypatch.setenv("DYNSNAP_KEEP_LOGS", "1")
    w = page_worker(256)
    sha_before = w.ask("sha")["sha256"]
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    r = ds.restore(snap.path, lazy=True, verify=False)
    assert r.fill is not None and r.pid == w.pid
    filling = not r.fill.done()
    assert w.ask("write 11 2000") == {"ok": True}        # pages written while (most likely) not filled yet
    first = w.ask("check 7")
    filled = r.wait_filled(timeout=120)
    assert first["bad"] == 0 and first["pages"] == 65536, first
    assert w.ask("check 8")["bad"] == 0
    assert filled >= r.timings["total"] > 0
    logs = sorted((home / "logs").glob("restore-*/lazy-pages.log"), key=lambda p: p.stat().st_mtime)
    text = logs[-1].read_text()
    assert "#PF at" in text, "the daemon served no page fault"
    assert "UFFD transferred pages: (" in text
    # the pages written after the restore differ from the snapshot; the rest is the snapshot's, byte for byte
    assert w.ask("sha")["sha256"] != sha_before
    print(f"fill still running when the worker was first asked: {filling}")


def test_lazy_restore_verified_is_default_and_exact(page_worker, tmp_path, home):
    """The default restore of a CPU snapshot is lazy here (uffd works on this kernel) and verified; the memory's
    hash is the snapshot's; `dynsnap restore` returns only once all memory is in."""
    import dynsnap_core as ds
    from dynsnap_core import lazy_pages
    from dynsnap_core.criu import find_criu
    assert lazy_pages.supported(find_criu())
    w = page_worker(64)
    sha_before = w.ask("sha")["sha256"]
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    r = cli("restore", snap.path)          # returns as soon as the tree runs
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"restored pid {w.pid} from {snap.path}; ") and "verify" in r.stdout, r.stdout
    assert w.ask("sha")["sha256"] == sha_before
    assert w.ask("check 3")["bad"] == 0
    assert wait_until(lambda: not _criu_children(), 60), "the lazy-pages daemon exits once every page is in"
    assert wait_until(lambda: not list((home / "logs").glob("restore-*")), 60), "a complete fill removes its logs"
    os.kill(w.pid, signal.SIGKILL)
    assert gone(w.pid)
    r = cli("restore", "--wait-filled", "--json", snap.path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["filling"] is False and out["memory_filled"] >= out["criu_restore_and_verify"] > 0
    assert w.ask("sha")["sha256"] == sha_before


def test_killed_daemon_kills_the_tree(page_worker, tmp_path, home):
    """A daemon that dies before every page is in would leave zero pages behind: the restored tree is killed
    and wait_filled says why in one sentence."""
    import dynsnap_core as ds
    w = page_worker(384)
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    r = ds.restore(snap.path, lazy=True, verify=False)
    os.kill(r.fill.daemon_pid, signal.SIGKILL)
    with pytest.raises(ds.CriuError, match=r"CRIU's lazy-pages daemon ended \(killed\) before every page was in; "
                                           r"the restored tree was killed \(its memory was incomplete\)"):
        r.wait_filled(timeout=60)
    assert gone(w.pid), "a tree whose memory is incomplete must not keep running"
    assert not _criu_children()


def test_damaged_pages_never_run_lazily(page_worker, tmp_path, home):
    import dynsnap_core as ds
    w = page_worker(32)
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    victim = max((snap.path / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(ds.SnapshotCorrupt, match="does not match its checksum"):
        ds.restore(snap.path, lazy=True)
    assert gone(w.pid), "nothing may run from a damaged snapshot"
    assert not _criu_children(), "no lazy-pages daemon outlives a failed restore"


def test_mode_choice_and_errors(page_worker, tmp_path, home, monkeypatch):
    import dynsnap_core as ds
    w = page_worker(16)
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    with pytest.raises(ds.InvalidArgument, match="cannot be combined with prefetch 'tmpfs'"):
        ds.restore(snap.path, lazy=True, prefetch="tmpfs")
    with pytest.raises(ds.InvalidArgument, match="lazy must be True, False or None, not 'yes'"):
        ds.restore(snap.path, lazy="yes")
    with pytest.raises(ds.InvalidArgument, match=r"transparent huge pages for the restore \(--thp\) need an eager"):
        ds.restore(snap.path, lazy=True, thp=True)
    monkeypatch.setenv("DYNSNAP_RESTORE_LAZY", "maybe")
    with pytest.raises(ds.InvalidArgument, match="DYNSNAP_RESTORE_LAZY='maybe': use 'on' or 'off'"):
        ds.restore(snap.path)
    monkeypatch.setenv("DYNSNAP_RESTORE_LAZY", "off")
    r = ds.restore(snap.path)
    assert r.fill is None and "memory_filled" not in r.timings and r.wait_filled() == 0.0
    assert w.ask("check 1")["bad"] == 0


def test_resealed_damage_fails_cleanly_when_lazy(page_worker, tmp_path, home):
    """A pagemap damaged and re-sealed (it passes verification; an eager CRIU loops on it): a lazy restore fails
    with one sentence from CRIU's log, and neither the tree nor a daemon is left."""
    import dynsnap_core as ds
    from criu_images import pagemap, raise_nr_pages, reseal
    w = page_worker(8)
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    raise_nr_pages(pagemap(snap.path), 0)
    reseal(snap.path, pagemap(snap.path))
    r = cli("restore", "--lazy", snap.path, env={"DYNSNAP_CRIU_TIMEOUT": "60"}, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") >= 1
    assert f"CRIU restore of pid {w.pid} failed: " in r.stderr and f"(log: {home}/logs/restore-" in r.stderr
    assert gone(w.pid) and not _criu_children()


def test_no_fd_or_process_left_when_nobody_waits(page_worker, tmp_path, home):
    """A long-running caller (the agent) that never calls wait_filled keeps no descriptor of the fill: once the
    supervisor is done, its report pipe is closed and the supervisor reaped; wait_filled still answers after."""
    import dynsnap_core as ds
    w = page_worker(32)
    snap = ds.checkpoint(w.pid, tmp_path / "snap")
    w.reap_original()
    fds_before = set(os.listdir("/proc/self/fd"))
    r = ds.restore(snap.path, lazy=True)
    assert wait_until(lambda: r.fill.run._proc.returncode is not None, 60)
    assert wait_until(lambda: set(os.listdir("/proc/self/fd")) <= fds_before, 60), \
        "a descriptor of the fill stayed open"
    assert r.wait_filled(timeout=60) > 0
    assert w.ask("check 4")["bad"] == 0

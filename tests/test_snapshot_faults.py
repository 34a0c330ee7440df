"""Bad input and faults: one clear line, non-zero exit, the source keeps running, nothing half-written stays."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, cli, write_manifest

pytestmark = pytest.mark.criu


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def one_line(r: subprocess.CompletedProcess, cmd: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"dynsnap {cmd}: ")
    return lines[0][len(f"dynsnap {cmd}: "):]


def test_no_such_pid(tmp_path, home):
    r = cli("checkpoint", "--pid", 4000000, "--out", tmp_path / "s")
    assert one_line(r, "checkpoint") == "no such process: 4000000"
    assert _leftovers(tmp_path) == ["home"] or _leftovers(tmp_path) == []


def test_pid_1(tmp_path):
    r = cli("checkpoint", "--pid", 1, "--out", tmp_path / "s")
    assert one_line(r, "checkpoint") == "refusing to checkpoint pid 1 (init): it would freeze the whole system"
    assert not (tmp_path / "s").exists()


def test_own_pid(tmp_path):
    # The test runner is dynsnap's parent: checkpointing it would freeze dynsnap itself.
    r = cli("checkpoint", "--pid", os.getpid(), "--out", tmp_path / "s")
    assert one_line(r, "checkpoint") == (f"refusing to checkpoint pid {os.getpid()}: it is dynsnap itself or "
                                         "one of its parents")


def test_not_root(workload, tmp_path):
    w = workload()
    os.chmod(tmp_path, 0o777)
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", user=65534)
    assert one_line(r, "checkpoint") == "checkpoint needs root or CAP_CHECKPOINT_RESTORE; run dynsnap with sudo"
    r = cli("restore", tmp_path / "s", user=65534)
    assert one_line(r, "restore") == "restore needs root or CAP_CHECKPOINT_RESTORE; run dynsnap with sudo"
    assert w.alive() and w.request()["all_ok"]
    assert not (tmp_path / "s").exists()


def test_criu_missing_or_too_old(workload, tmp_path):
    w = workload()
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", env={"DYNSNAP_CRIU": "/nonexistent/criu"})
    assert one_line(r, "checkpoint") == ("DYNSNAP_CRIU=/nonexistent/criu does not run or does not print a "
                                         "CRIU version")
    # A CRIU that is too old for this kernel (Debian 12's 3.17 prints exactly this) is refused up front.
    old = tmp_path / "criu-3.17"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", env={"DYNSNAP_CRIU": str(old)})
    msg = one_line(r, "checkpoint")
    assert msg.startswith(f"CRIU is too old for this kernel ({old} is 3.17.1")
    assert w.alive() and w.request()["all_ok"]
    assert not (tmp_path / "s").exists()


def test_dir_exists(workload, tmp_path):
    w = workload()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep").write_text("mine")
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s")
    assert one_line(r, "checkpoint") == f"{tmp_path / 's'} already exists; choose another --out or remove it"
    assert (tmp_path / "s" / "keep").read_text() == "mine"
    assert w.alive() and w.state() != "T" and w.request()["all_ok"]


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_full_file_system(workload, small_fs):
    w = workload("--mem-mb", "64")
    before = w.request()
    r = cli("checkpoint", "--pid", w.pid, "--out", small_fs / "snap")
    msg = one_line(r, "checkpoint")
    assert msg.startswith(f"writing the snapshot failed at {small_fs}/.snap.dynsnap-staging.")
    assert msg.endswith(": No space left on device"), msg
    assert _leftovers(small_fs) == [], "staging must be removed"
    time.sleep(0.1)
    assert w.alive() and w.state() != "T"
    after = w.request()
    assert after["all_ok"] and after["counter"] == before["counter"] + 1


def test_undumpable_process(workload, tmp_path):
    """A process holding an io_uring instance cannot be dumped by CRIU 4.1: refused before freezing anything."""
    w = workload("--io-uring")
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s")
    msg = one_line(r, "checkpoint")
    assert msg.startswith(f"cannot checkpoint pid {w.pid}: pid {w.pid} holds an io_uring instance, which CRIU "
                          "cannot checkpoint; close the ring first (fd ")
    assert not (tmp_path / "s").exists()
    assert [p for p in tmp_path.iterdir() if "staging" in p.name] == []
    time.sleep(0.1)
    assert w.alive() and w.state() != "T" and w.request()["all_ok"]


def test_session_leader_outside_pid_namespace(tmp_path, home):
    """A worker whose session leader lives in a parent pid namespace (sid 0 in its own, as after `docker exec`)
    is refused before freezing, with the fix in the sentence; the worker keeps running."""
    script = (f"sleep 300 & w=$!; {sys.executable} -m dynsnap_core.cli checkpoint --pid $w --out {tmp_path}/s "
              f"2>{tmp_path}/err; echo rc=$? pid=$w state=$(cut -d' ' -f3 /proc/$w/stat); kill $w")
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    fields = dict(kv.split("=") for kv in r.stdout.split())
    assert fields["rc"] == "1" and fields["state"] == "S", r.stdout
    pid = fields["pid"]
    assert (tmp_path / "err").read_text() == (
        f"dynsnap checkpoint: cannot checkpoint pid {pid}: pid {pid} belongs to a session whose leader is outside "
        "its pid namespace (it was started from a parent namespace, as `docker exec` or `nsenter` do), which CRIU "
        "cannot checkpoint; start the worker with `setsid` so that it leads its own session\n")
    assert not (tmp_path / "s").exists()


def test_injected_dump_failure(workload, tmp_path, home):
    """CRIU's own fault injection makes the dump fail mid-way; the worker keeps serving; CRIU's log is kept."""
    w = workload("--threads", "2")
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", env={"DYNSNAP_FAULT": "dump"})
    msg = one_line(r, "checkpoint")
    assert msg.startswith(f"CRIU dump of pid {w.pid} failed: fault: Dump VMA pages failure! (log: {home}/logs/dump-")
    log = msg.split("(log: ")[1].rstrip(")")
    assert "Dumping FAILED" in Path(log).read_text()
    assert not (tmp_path / "s").exists()
    time.sleep(0.1)
    assert w.alive() and w.request()["all_ok"]


@pytest.fixture
def snapshot(workload, tmp_path, home):
    w = workload("--mem-mb", "8", "--memfd")
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", out)
    assert r.returncode == 0, r.stderr
    w.reap_original()
    return w, out


def _pages(out: Path) -> Path:
    return max((out / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-json", "bad-magic"])
def test_damaged_snapshot_is_refused(snapshot, damage):
    w, out = snapshot
    if damage == "truncate":
        victim = _pages(out)
        os.truncate(victim, victim.stat().st_size - 1)
        want = f"{victim} has {victim.stat().st_size} bytes, the manifest says {victim.stat().st_size + 1} " \
               "(truncated or altered)"
    elif damage == "flip":
        victim = _pages(out)
        with open(victim, "r+b") as f:
            f.seek(victim.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
        want = f"{victim} does not match its checksum"
    elif damage == "no-manifest":
        (out / "manifest.json").unlink()
        want = f"{out / 'manifest.json'} is missing: this is not a complete dynsnap snapshot"
    elif damage == "bad-json":
        (out / "manifest.json").write_text("{not json")
        want = f"{out / 'manifest.json'} is malformed: not valid JSON"
    else:
        m = json.loads((out / "manifest.json").read_text())
        m["magic"] = "something-else"
        (out / "manifest.json").write_text(json.dumps(m))
        want = f"{out / 'manifest.json'} is malformed: it is not a dynsnap manifest (bad magic)"
    for cmd in ("verify", "restore"):
        r = cli(cmd, out)
        assert one_line(r, cmd).startswith(want), r.stderr
    assert not w.alive(), "nothing may be restored from a damaged snapshot"


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGKILL", "Ctrl-C"])
def test_killed_checkpoint_leaves_none_or_complete(sig, group, workload, tmp_path, home):
    """Kill `dynsnap checkpoint` at several moments: either no snapshot or a complete, verifiable one. Ctrl-C
    reaches the whole process group of a terminal's job: CRIU, in its own group, must not get it."""
    w = workload("--mem-mb", "200")
    outcomes = []
    for i, delay in enumerate((0.05, 0.3, 0.6, 0.9, 1.3)):
        out = tmp_path / f"s{i}"
        p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "checkpoint", "--pid", str(w.pid),
                              "--out", str(out), "--leave-running"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=group)
        time.sleep(delay)
        if group:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        p.communicate(timeout=120)
        if out.exists():
            r = cli("verify", out)
            assert r.returncode == 0, f"visible snapshot after {sig.name} at {delay}s is incomplete: {r.stderr}"
            outcomes.append("complete")
        else:
            outcomes.append("none")
        if sig == signal.SIGKILL:
            # SIGKILL cannot be caught: dynsnap's guardian waits for CRIU to let go, then continues the tree.
            end = time.monotonic() + 60
            while time.monotonic() < end and w.state() in ("T", "t"):     # stopped, or CRIU still tracing
                time.sleep(0.05)
        if sig != signal.SIGKILL:
            assert not [x for x in tmp_path.iterdir() if "staging" in x.name], "staging must be cleaned"
        assert w.state() != "T", f"source left stopped after {sig.name} at {delay}s"
        assert w.alive() and w.request()["all_ok"]
    # Stale staging from SIGKILL is invisible and cleaned by the next dynsnap run on that directory,
    # and so are CRIU dump directories left in tmpfs by a killed dynsnap.
    cli("list", "--root", tmp_path)
    assert not [x for x in tmp_path.iterdir() if "staging" in x.name]
    from dynsnap_core.proc import exists
    left = [n for n in os.listdir("/dev/shm") if n.startswith("dynsnap-dump-") and not exists(int(n.split("-")[2].split(".")[0]))]
    assert left == []
    assert outcomes  # every outcome was either 'none' or a verified 'complete'


def test_guardian_waits_for_criu_before_continuing(workload):
    """After dynsnap dies, the guardian continues the tree only once the CRIU process it was told about has
    ended (CRIU may not even have seized the tree yet when dynsnap dies)."""
    from dynsnap_core.guardian import Guardian
    w = workload()
    stand_in = subprocess.Popen(["sleep", "1.5"])      # the process the guardian must outlive, as it would CRIU
    g = Guardian([w.pid])
    g.criu(stand_in.pid)
    os.kill(w.pid, signal.SIGSTOP)                    # as CRIU --leave-stopped leaves it
    g._proc.stdin.close()                             # dynsnap "dies": the pipe closes without "done"
    time.sleep(1.0)
    assert stand_in.poll() is None and w.state() == "T", "continued while CRIU was still running"
    stand_in.wait()
    g._proc.wait(timeout=30)
    assert w.state() != "T" and w.request()["all_ok"]


def test_criu_gate_closed_means_criu_never_runs(workload, tmp_path):
    """If dynsnap dies before it opened CRIU's gate (here: on_start fails), CRIU never starts: no dump, no freeze."""
    from dynsnap_core.criu import find_criu
    w = workload("--mem-mb", "16")
    seen = []

    def dies(pid: int) -> None:
        seen.append(pid)
        raise KeyboardInterrupt

    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(KeyboardInterrupt):
        find_criu().run(["dump", "-t", str(w.pid), "-D", str(images), "--leave-stopped"], log=images / "d.log",
                        stage="dump", pid=w.pid, on_start=dies)
    assert len(seen) == 1 and not os.path.exists(f"/proc/{seen[0]}")     # the gate exited (and was reaped)
    assert list(images.iterdir()) == []                                  # CRIU never ran: not even its log
    assert w.state() not in ("T", "t") and w.request()["all_ok"]


def test_gpu_snapshot_refused_without_driver(snapshot):
    """A snapshot holding GPU state is refused before anything is touched on a machine without the driver."""
    from dynsnap_core import cuda
    if cuda.is_available():
        pytest.skip("this machine has a CUDA driver with the checkpoint API")
    w, out = snapshot
    m = json.loads((out / "manifest.json").read_text())
    m["cuda"] = {"pids": [w.pid], "driver_version": 13000,
                 "devices": [{"index": 0, "name": "NVIDIA H200", "uuid": "GPU-10748f67-e706-3b40-0efb-3b26c9953d03"}]}
    write_manifest(out, m)
    r = cli("restore", out)
    assert one_line(r, "restore") == ("this snapshot holds GPU state but this machine cannot restore it: "
                                      + cuda.driver_info()["reason"])
    assert not w.alive()


def test_commit_never_replaces(tmp_path):
    """The final rename never replaces a directory that appeared meanwhile, even an empty one."""
    from dynsnap_core import SnapshotExists
    from dynsnap_core.snapshot import _rename_noreplace
    src, dst = tmp_path / ".s.staging", tmp_path / "s"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    dst.mkdir()
    with pytest.raises(SnapshotExists, match="appeared while the snapshot was being written"):
        _rename_noreplace(src, dst)
    assert (src / "manifest.json").exists() and list(dst.iterdir()) == []
    dst.rmdir()
    _rename_noreplace(src, dst)
    assert (dst / "manifest.json").exists() and not src.exists()


def test_restore_refuses_zombie_held_pid(workload, tmp_path):
    """A pid of the snapshot held by an unreaped zombie is named, with its parent, before CRIU runs."""
    w = workload("--child")
    child = [p for p in w.tree_pids if p != w.pid][0]
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.popen.wait(timeout=30)                   # the root is reaped; its child is now our unreaped zombie
    end = time.monotonic() + 10
    while Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < end
        time.sleep(0.01)
    r = cli("restore", out)
    assert one_line(r, "restore") == (f"pid {child} is held by a zombie that its parent (pid {os.getpid()}) has "
                                      "not reaped yet; a snapshot restores with its original pids")
    w.reap_original()
    r = cli("restore", out)
    assert r.returncode == 0, r.stderr
    assert w.request()["child"]["ok"]

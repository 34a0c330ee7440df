"""Round trips through real CRIU: checkpoint -> kill -> restore, and the restored process proves its state."""
from __future__ import annotations

import json
import os
import signal

import pytest

from helpers import cli

pytestmark = pytest.mark.criu

FEATURES = {
    "memory": ("--mem-mb", "300"),
    "threads": ("--threads", "6"),
    "pipe": ("--pipe",),
    "memfd": ("--memfd",),
    "child": ("--child",),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_round_trip_cli(feature, workload, tmp_path, home):
    w = workload(*FEATURES[feature])
    before = w.request()
    assert before["all_ok"], before
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["path"] == str(out) and info["pid"] == w.pid and info["bytes"] > 0
    w.reap_original()
    assert not w.alive(), "without --leave-running the source stops after the snapshot"
    assert (out / "manifest.json").exists()

    r = cli("restore", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["pid"] == w.pid
    assert res["criu_restore"] > 0
    after = w.request()
    assert after["all_ok"], after
    assert after["pid"] == w.pid
    # It continues from where it stopped: the request counter goes on, it does not start over.
    assert after["counter"] == before["counter"] + 1
    if feature == "memory":
        assert after["mem"]["sha256"] == before["mem"]["sha256"]
    if feature == "threads":
        assert after["threads"]["alive"] == 6 and after["threads"]["ticks"] > before["threads"]["ticks"]
    if feature == "child":
        # The whole tree came back: the child keeps its pid and still talks over the inherited pipes.
        assert after["child"]["pid"] == before["child"]["pid"] and os.path.exists(f"/proc/{after['child']['pid']}")


def test_round_trip_file_and_listening_socket(workload, tmp_path, home):
    """A file open for writing keeps its position; the listening Unix socket keeps accepting."""
    path = tmp_path / "out.txt"
    w = workload("--file", str(path))
    assert w.request()["file"]["lines"] == 2
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    r = cli("restore", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"restored pid {w.pid} from {out}")
    after = w.request()
    assert after["file"] == {"ok": True, "lines": 3, "pos": len("line 0\nline 1\nline 2\n")}
    assert path.read_text() == "line 0\nline 1\nline 2\n"


def test_python_api_leave_running(workload, tmp_path, home):
    import dynsnap_core as ds
    w = workload("--mem-mb", "64", "--threads", "2")
    before = w.request()
    snap = ds.checkpoint(w.pid, tmp_path / "snap", leave_running=True)
    assert isinstance(snap, ds.Snapshot)
    assert w.alive() and w.state() != "T"
    mid = w.request()
    assert mid["all_ok"] and mid["counter"] == before["counter"] + 1
    assert snap.verify() == snap.total_bytes
    m = snap.manifest
    assert m["root_pid"] == w.pid and m["cmdline"][1].endswith("zdtm.py")
    assert m["criu_version"].startswith("4.") and m["checksum"] == "xxh3-64"
    assert m["total_bytes"] == sum(f["size"] for f in m["files"]) > 64 << 20
    assert {"criu_dump", "persist", "total"} <= set(m["timings"])
    # Restoring while the source still runs is refused with a clear sentence: pids are taken.
    with pytest.raises(ds.DynsnapError, match=f"pid {w.pid} is in use"):
        ds.restore(snap.path)
    os.kill(w.pid, signal.SIGKILL)
    w.reap_original()
    r = ds.restore(snap.path)
    assert isinstance(r, ds.RestoredProcess) and r.pid == w.pid and r.alive()
    after = w.request()
    assert after["all_ok"] and after["mem"]["sha256"] == before["mem"]["sha256"]
    # The restored process resumes from the snapshot moment, not from after it.
    assert after["counter"] == before["counter"] + 1


def test_default_home_list_inspect_verify(workload, tmp_path, home):
    w = workload("--memfd")
    r = cli("checkpoint", "--pid", w.pid, "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    path = json.loads(r.stdout)["path"]
    assert path.startswith(str(home / "snapshots") + "/python")
    r = cli("list", "--json")
    rows = json.loads(r.stdout)
    assert [x["path"] for x in rows] == [path] and rows[0]["status"] == "ok" and "zdtm.py" in rows[0]["command"]
    r = cli("list")
    assert r.returncode == 0 and os.path.basename(path) in r.stdout and "zdtm.py" in r.stdout
    r = cli("verify", os.path.basename(path))          # a bare name resolves under the home
    assert r.returncode == 0 and ": ok," in r.stdout, r.stderr
    r = cli("inspect", path, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "snapshot" and info["manifest"]["root_pid"] == w.pid
    r = cli("inspect", path)
    assert f"pid {w.pid}" in r.stdout and "xxh3-64" in r.stdout
    assert "restores   with its original pids, which must be free\n" in r.stdout
    r = cli("inspect", os.path.join(path, "criu", "core-%d.img" % w.pid), "--json")
    assert json.loads(r.stdout)["kind"] == "criu image"


def test_rm(workload, tmp_path, home):
    w = workload()
    r = cli("checkpoint", "--pid", w.pid, "--leave-running", "--json")
    path = json.loads(r.stdout)["path"]
    name = os.path.basename(path)
    r = cli("rm", name)
    assert r.returncode == 0 and r.stdout == f"removed {path}\n" and not os.path.exists(path)
    assert os.listdir(home / "snapshots") == []
    r = cli("rm", name)
    assert r.returncode == 1 and r.stderr == f"dynsnap rm: no snapshot at {os.path.abspath(name)}\n"
    other = tmp_path / "not-a-snapshot"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = cli("rm", other, "--force")
    assert r.returncode == 1 and r.stderr.startswith(f"dynsnap rm: refusing to remove {other}: ")
    assert (other / "keep.txt").read_text() == "mine"
    # A damaged snapshot goes only with --force.
    import dynsnap_core as ds
    snap = ds.checkpoint(w.pid, tmp_path / "snap", leave_running=True)
    (snap.path / "manifest.json").write_text("{broken")
    r = cli("rm", snap.path)
    assert r.returncode == 1 and "(use --force for a damaged snapshot)" in r.stderr
    assert cli("rm", snap.path, "--force").returncode == 0 and not snap.path.exists()
    assert w.alive()


def test_shell_job_with_a_terminal(tmp_path, home):
    """A worker started from a shell (terminal on stdio, in the shell's session) is a shell job: dynsnap says
    so at checkpoint, refuses a restore without a terminal in one sentence, and restores it from one."""
    import subprocess
    import sys
    import time

    from helpers import HERE, wait_ready
    master, slave = os.openpty()
    sock, ready, pidfile, tty = tmp_path / "w.sock", tmp_path / "ready", tmp_path / "w.pid", os.ttyname(slave)
    # A shell leads the session (inside our pid namespace, whatever session the test runner has); the worker is
    # its job, with the terminal on its stdio.
    shell = subprocess.Popen(["setsid", "sh", "-c", f"{sys.executable} {HERE / 'workloads' / 'zdtm.py'} --sock {sock} "
                              f"--ready {ready} <{tty} >{tty} 2>{tty} & echo $! >{pidfile}; wait"], stdin=slave)
    pid = None
    try:
        wait_ready(shell, ready, tmp_path / "none.log", "shell-job workload failed to start")
        pid = int(pidfile.read_text())
        out = tmp_path / "snap"
        r = cli("checkpoint", "--pid", pid, "--out", out)
        assert r.returncode == 0, r.stderr
        assert f"note: pid {pid} has a terminal on its stdio" in r.stderr
        assert json.loads((out / "manifest.json").read_text())["shell_job"] is True
        shell.wait(timeout=30)                          # the job was killed after its snapshot; its shell ends
        r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "restore", str(out)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, env={**os.environ})
        assert r.returncode == 1 and "the snapshot is a shell job" in r.stderr and len(r.stderr.splitlines()) == 1
        from dynsnap_core.proc import reap_children
        end = time.monotonic() + 10          # CRIU's half-restored task was killed: reap it (we are the subreaper)
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            reap_children()
            time.sleep(0.01)
        # From a terminal: a shell-like session leader whose controlling terminal is the pty stays alive (a
        # job dies with its terminal session, as in any shell) while dynsnap restores the job into it.
        term = subprocess.Popen(["setsid", "--ctty", "sh", "-c", f"{sys.executable} -m dynsnap_core.cli restore "
                                 f"{out} >/dev/null 2>{tmp_path}/restore.err; echo rc=$?; sleep 30"],
                                stdin=slave, stdout=subprocess.PIPE, text=True)
        try:
            line = term.stdout.readline().strip()
            assert line == "rc=0", (tmp_path / "restore.err").read_text()
            time.sleep(0.5)      # the restored job must outlive the restorer (no orphaned-pgrp SIGHUP)
            from helpers import request_json
            assert request_json(sock, "check")["all_ok"]
        finally:
            term.kill()
            term.wait()
            term.stdout.close()
    finally:
        for victim in (pid, shell.pid):
            try:
                if victim:
                    os.kill(victim, 9)
            except ProcessLookupError:
                pass
        shell.wait()
        os.close(master)
        os.close(slave)


def test_round_trip_staging_on_target(workload, tmp_path, home):
    """With DYNSNAP_STAGING=target CRIU dumps next to the snapshot; the files are hashed and fsynced in place."""
    w = workload("--mem-mb", "64", "--memfd")
    before = w.request()
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", out, "--json", env={"DYNSNAP_STAGING": "target"})
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["dump_staging"] == "target" and m["io_engine"] in ("io_uring", "aio", "psync")
    assert cli("verify", out).returncode == 0
    w.reap_original()
    assert cli("restore", out).returncode == 0
    after = w.request()
    assert after["all_ok"] and after["mem"]["sha256"] == before["mem"]["sha256"]

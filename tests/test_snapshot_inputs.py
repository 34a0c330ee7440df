"""The issue's 'smaller, all real' list: rm safety, pid overflow, thread ids, concurrent checkpoints, API type errors,
restore --memsvc to nowhere, DYNSNAP_STAGING, a full DYNSNAP_HOME, the kept log of a failed target-staged dump."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, cli, fail_line

pytestmark = [pytest.mark.criu, pytest.mark.timeout(120)]


@pytest.fixture
def snap(workload, tmp_path, home):
    w = workload("--mem-mb", "2")
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", out)
    assert r.returncode == 0, r.stderr
    w.reap_original()
    return w, out


# ---- rm

def test_rm_force_refuses_a_directory_that_merely_holds_a_manifest(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    (d / "thesis.tex").write_text("years of work")
    r = cli("rm", "--force", d)
    assert fail_line(r, "rm") == (f"refusing to remove {d}: it holds thesis.tex, which a dynsnap snapshot never does; "
                                  "remove it yourself if you are sure")
    assert (d / "thesis.tex").read_text() == "years of work"


def test_rm_force_removes_a_damaged_snapshot(snap):
    _w, out = snap
    (out / "manifest.json").write_text("{broken")
    assert fail_line(cli("rm", out), "rm").startswith(f"refusing to remove {out}: ")
    r = cli("rm", "--force", out)
    assert r.returncode == 0 and r.stdout == f"removed {out}\n" and not out.exists()


def test_rm_bare_name_that_names_two_snapshots_is_refused(snap, home, tmp_path):
    _w, out = snap
    root = home / "snapshots"
    root.mkdir(parents=True)
    shutil.copytree(out, root / "twin")
    here = tmp_path / "cwd"
    here.mkdir()
    shutil.copytree(out, here / "twin")
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "rm", "twin"], cwd=here, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert fail_line(r, "rm") == (f"'twin' names both {here / 'twin'} and {root / 'twin'}; write ./twin or the full "
                                  "path")
    assert (here / "twin").exists() and (root / "twin").exists()
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "rm", "./twin"], cwd=here, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert not (here / "twin").exists() and (root / "twin").exists()


def test_rm_of_a_symlink_is_refused_and_changes_nothing(snap, tmp_path):
    _w, out = snap
    link = tmp_path / "link"
    link.symlink_to(out)
    r = cli("rm", link)
    assert fail_line(r, "rm") == (f"{link} is a symbolic link to {out}: dynsnap rm removes snapshot directories, not "
                                  "links; name the snapshot itself, or remove the link with rm(1)")
    assert link.is_symlink() and out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---- checkpoint arguments

@pytest.mark.parametrize("pid", ["2147483648", str(10 ** 20)])
def test_pid_overflow(pid, tmp_path):
    r = cli("checkpoint", "--pid", pid, "--out", tmp_path / "s")
    assert fail_line(r, "checkpoint") == f"no such process: {pid} (Linux pids are at most 4194304)"


def test_thread_id_is_refused(workload, tmp_path):
    w = workload("--threads", "2")
    tid = next(int(t) for t in os.listdir(f"/proc/{w.pid}/task") if int(t) != w.pid)
    r = cli("checkpoint", "--pid", tid, "--out", tmp_path / "s")
    assert fail_line(r, "checkpoint") == (f"pid {tid} is a thread of process {w.pid}, not a process; checkpoint pid "
                                          f"{w.pid}")
    assert w.request()["all_ok"]


def test_concurrent_checkpoint_of_the_same_tree(workload, tmp_path, home, monkeypatch):
    """While a checkpoint holds the tree (its per-process locks), a second one says so and touches nothing."""
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    from dynsnap_core.journal import TreeLock
    w = workload("--child")
    held = TreeLock([w.tree_pids[-1]])           # the other checkpoint holds the child
    try:
        r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s")
        assert fail_line(r, "checkpoint") == (
            f"another checkpoint of this tree is running (pid {w.tree_pids[-1]} is being checkpointed by dynsnap pid "
            f"{os.getpid()}); wait for it to finish")
    finally:
        held.release()
    assert not (tmp_path / "s").exists() and w.state() != "T" and w.request()["all_ok"]
    assert cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", "--leave-running").returncode == 0


def test_two_real_checkpoints_at_once(workload, tmp_path, home):
    """Two dynsnap checkpoints of one worker started together: one wins, the other names the conflict (or, when
    the first was already done, succeeds too); the worker keeps running."""
    w = workload("--mem-mb", "64")
    procs = [subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "checkpoint", "--pid", str(w.pid), "--out",
                               str(tmp_path / f"s{i}"), "--leave-running"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = sorted(rc for _o, _e, rc in results)
    assert codes in ([0, 0], [0, 1]), results
    for _o, err, rc in results:
        if rc == 1:
            assert "another checkpoint of this tree is running" in err, err
    time.sleep(0.2)
    assert w.state() != "T" and w.request()["all_ok"]


def test_staging_setting_is_checked(workload, tmp_path):
    w = workload()
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", env={"DYNSNAP_STAGING": "bogus"})
    assert fail_line(r, "checkpoint") == "DYNSNAP_STAGING='bogus' is not one of auto, tmpfs, target"
    assert w.state() != "T" and w.request()["all_ok"]


def test_python_api_type_errors_are_dynsnap_errors(workload, tmp_path):
    import dynsnap_core as ds
    w = workload()
    cases = [
        (lambda: ds.checkpoint(w.pid, out=123), ds.InvalidArgument, "out must be a path (str or os.PathLike), not int"),
        (lambda: ds.checkpoint(w.pid, tmp_path / "s", engine="bogus"), ds.InvalidArgument,
         "unknown I/O engine 'bogus'"),
        (lambda: ds.restore(None), ds.InvalidArgument, "path must be a path (str or os.PathLike), not NoneType"),
        (lambda: ds.checkpoint(2 ** 70, tmp_path / "s"), ds.ProcessNotFound, "no such process: "),
        (lambda: ds.checkpoint("12", tmp_path / "s"), ds.ProcessNotFound, "invalid pid '12'"),
        (lambda: ds.checkpoint(w.pid, tmp_path / "s", extra_manifest={"x": object()}), ds.InvalidArgument,
         "extra_manifest must hold JSON values only"),
        (lambda: ds.checkpoint(w.pid, tmp_path / "s", extra_manifest=[1]), ds.InvalidArgument,
         "extra_manifest must be a dict with string keys"),
        (lambda: ds.checkpoint(w.pid, tmp_path / "s", extra_manifest={"root_pid": 1}), ds.InvalidArgument,
         "extra_manifest may not override 'root_pid'"),
        (lambda: ds.checkpoint(w.pid, tmp_path / "s", leave_running="yes"), ds.InvalidArgument,
         "leave_running must be True or False"),
    ]
    for call, kind, start in cases:
        with pytest.raises(kind) as ei:
            call()
        assert isinstance(ei.value, ds.DynsnapError) and str(ei.value).startswith(start), str(ei.value)
    assert not (tmp_path / "s").exists() and w.state() != "T" and w.request()["all_ok"]


# ---- restore

def test_restore_with_unreachable_memsvc(snap):
    w, out = snap
    r = cli("restore", out, "--memsvc", "/nonexistent.sock")
    assert fail_line(r, "restore") == ("cannot reach the memory service at /nonexistent.sock: No such file or "
                                       "directory")
    assert not w.alive()


@pytest.fixture
def small_home(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_restore_with_a_full_home_names_the_full_disk(snap, small_home):
    w, out = snap
    (small_home / "logs").mkdir()
    with open(small_home / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    r = cli("restore", out, env={"DYNSNAP_HOME": str(small_home)})
    assert fail_line(r, "restore") == (f"cannot prepare CRIU's restore log in {small_home / 'logs'}: no space left on "
                                       "device (CRIU's log and pidfile go there: free 4 MiB or set DYNSNAP_HOME "
                                       "elsewhere)")
    assert not w.alive()


def test_failed_target_staged_dump_keeps_its_log(workload, tmp_path, home):
    w = workload()
    r = cli("checkpoint", "--pid", w.pid, "--out", tmp_path / "s", env={"DYNSNAP_FAULT": "dump",
                                                                        "DYNSNAP_STAGING": "target"})
    msg = fail_line(r, "checkpoint")
    log = Path(msg.split("(log: ")[1].rstrip(")"))
    assert log.parent == home / "logs" and "Dumping FAILED" in log.read_text()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    assert w.request()["all_ok"]

"""`dynsnap run`: a worker in its own pid namespace and session, whose snapshot restores with any pids in use,
several times over, on real CRIU."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dynsnap_core import proc
from helpers import HERE, cli, request_json

pytestmark = pytest.mark.criu


def _wait(cond, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        proc.reap_children()              # the test runner is the subreaper of everything started here
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    return not proc.exists(pid)           # a zombie does not exist either


@pytest.fixture
def inits():
    """Host pids of namespace inits started or restored by a test: SIGKILL ends each whole namespace."""
    made: list[int] = []
    yield made
    for pid in made:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in made:
        _wait(lambda: _gone(pid), f"pid {pid} to end")


def _run_worker(tmp_path: Path, inits: list[int], *flags: str) -> tuple[int, Path]:
    sock, ready, log = tmp_path / "w.sock", tmp_path / "ready", tmp_path / "w.log"
    r = cli("run", "--json", "--log", log, "--", sys.executable, HERE / "workloads" / "zdtm.py", "--sock", sock,
            "--ready", ready, *flags)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    pid = out["pid"]
    inits.append(pid)
    assert out == {"pid": pid, "pid_namespace": True, "log": str(log)}
    _wait(ready.exists, "the worker to be ready")
    return pid, sock


def test_run_snapshot_restores_twice_side_by_side(tmp_path, home, inits):
    init, sock = _run_worker(tmp_path, inits, "--mem-mb", "16", "--threads", "2")
    assert proc.pid_namespace_init(init) and proc.ns_ids(init)[-1] == 1
    [worker] = proc.children(init)
    assert proc.ns_ids(worker)[-1] == 2 and proc.ns_ids(worker, "NSsid")[-1] == 1   # session led inside
    before = request_json(sock, "check")
    assert before["all_ok"] and before["pid"] == 2

    snap = tmp_path / "snap"
    r = cli("checkpoint", "--pid", init, "--out", snap)
    assert r.returncode == 0, r.stderr
    m = json.loads((snap / "manifest.json").read_text())
    assert m["pid_namespace"] is True and m["shell_job"] is False and m["pids"] == [init, worker]
    _wait(lambda: _gone(init), "the checkpointed tree to end")
    r = cli("inspect", snap)
    assert ("restores   into a fresh pid namespace: any pids may be in use, copies can run side by side; its own mount "
            "namespace and /proc, the node's other mounts bound at the same paths") in r.stdout

    copies = []
    for i in range(2):                    # the second copy runs while the first holds the same in-namespace pids
        r = cli("restore", snap, "--json")
        assert r.returncode == 0, r.stderr
        pid = json.loads(r.stdout)["pid"]
        inits.append(pid)
        assert pid != init and proc.pid_namespace_init(pid) and pid not in copies
        copies.append(pid)
        after = request_json(sock, "check")
        assert after["all_ok"] and after["pid"] == 2 and after["counter"] == before["counter"] + 1
        assert after["mem"]["sha256"] == before["mem"]["sha256"]
        os.rename(sock, tmp_path / f"copy{i}.sock")   # its listening socket moves aside; the next copy binds anew
    for i in range(2):
        assert request_json(tmp_path / f"copy{i}.sock", "check")["counter"] == before["counter"] + 2
    assert all(proc.exists(p) and proc.state(p) != "Z" for p in copies)


def test_sigterm_to_the_init_reaches_the_worker(tmp_path, home, inits):
    """An init ignores signals it has no handler for; dynsnap's init forwards them, and ends with the worker.
    The worker's output goes to the log and nothing else does."""
    init, sock = _run_worker(tmp_path, inits)
    [worker] = proc.children(init)
    assert os.readlink(f"/proc/{worker}/fd/1") == os.readlink(f"/proc/{worker}/fd/2") == str(tmp_path / "w.log")
    assert os.readlink(f"/proc/{worker}/fd/0") == "/dev/null"
    os.kill(init, signal.SIGTERM)
    _wait(lambda: _gone(worker) and _gone(init), "the worker and its init to end on SIGTERM", timeout=10)
    assert (tmp_path / "w.log").read_text() == ""


def test_checkpoint_of_a_namespace_member_names_the_init(tmp_path, home, inits):
    init, sock = _run_worker(tmp_path, inits)
    [worker] = proc.children(init)
    r = cli("checkpoint", "--pid", worker, "--out", tmp_path / "s")
    assert r.returncode == 1 and r.stderr == (
        f"dynsnap checkpoint: cannot checkpoint pid {worker}: pid {worker} is pid 2 of a pid namespace, and CRIU "
        f"dumps a pid namespace from its init: checkpoint pid {init} instead\n")
    assert not (tmp_path / "s").exists()
    assert proc.state(worker) != "T" and request_json(sock, "check")["all_ok"]


@pytest.mark.parametrize("argv, msg", [
    ([], "nothing to run: give a command after --"),
    (["--", "/nonexistent/worker"], "cannot execute /nonexistent/worker: No such file or directory"),
    (["--log", "/nonexistent/dir/w.log", "--", "true"],
     "cannot open the log /nonexistent/dir/w.log: No such file or directory"),
    (["--cwd", "/nonexistent/dir", "--", "true"], "no such directory for the worker: /nonexistent/dir"),
])
def test_run_bad_command(tmp_path, argv, msg):
    r = cli("run", *argv)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"dynsnap run: {msg}\n")


def test_run_needs_root(tmp_path):
    r = cli("run", "--", "sleep", "30", user=65534)
    assert (r.returncode, r.stdout, r.stderr) == (
        1, "", "dynsnap run: run needs root (CAP_SYS_ADMIN) to create the worker's pid namespace; run dynsnap with "
        "sudo\n")


def _node_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return sorted(" ".join(ln.split()[3:5]) + " " + ln.split(" - ")[1].split()[0] for ln in fh)


def test_worker_sees_its_own_proc_and_the_nodes_file_systems(tmp_path, home, inits):
    """The worker's mount namespace: a /proc of its own pid namespace (the CUDA driver needs one), the node's
    other mounts (a file the node writes to /dev/shm is seen, before and after restore), none of their content
    in the snapshot, and the node's mount table untouched by run, checkpoint and restore."""
    shm = Path("/dev/shm") / f"dynsnap-test-see-{os.getpid()}"
    shm.write_text("written by the node")
    try:
        node_before = _node_mounts()
        init, sock = _run_worker(tmp_path, inits, "--see", shm)
        [worker] = proc.children(init)
        assert proc.mount_namespace(init) == "own" and proc.mount_namespace(worker) == "own"
        seen = request_json(sock, "check")["see"]
        assert seen["ok"] and seen["proc_self"] == "2" and seen["init"].endswith("nsinit.py"), seen
        assert seen["file"] == "written by the node" and seen["proc_mounts"] == 1, seen

        snap = tmp_path / "snap"
        r = cli("checkpoint", "--pid", init, "--out", snap)
        assert r.returncode == 0, r.stderr
        m = json.loads((snap / "manifest.json").read_text())
        assert m["mount_namespace"] is True and m["pid_namespace"] is True
        assert not [f for f in os.listdir(snap / "criu") if f.startswith("tmpfs-")]   # /dev/shm stayed outside
        _wait(lambda: _gone(init), "the checkpointed tree to end")

        shm.write_text("written by the node after the checkpoint")
        r = cli("restore", snap, "--json")
        assert r.returncode == 0, r.stderr
        pid = json.loads(r.stdout)["pid"]
        inits.append(pid)
        assert proc.mount_namespace(pid) == "own"
        after = request_json(sock, "check")
        assert after["all_ok"] and after["see"]["proc_self"] == "2" and after["see"]["proc_mounts"] == 1
        assert after["see"]["file"] == "written by the node after the checkpoint"
        assert sorted(after["see"]["mounts"]) == sorted(seen["mounts"])
        assert _node_mounts() == node_before
    finally:
        shm.unlink()


def test_process_over_another_root_file_system_is_refused(tmp_path):
    """A process in a mount namespace with another root (what a container runtime makes; here /usr as root) is
    refused before anything is frozen, with one sentence; it keeps running."""
    import subprocess
    p = subprocess.Popen(["unshare", "--mount", "--fork", "--root=/usr", "/bin/sleep", "60"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    inner = None
    try:
        _wait(lambda: bool(proc.children(p.pid)), "the contained process to start")
        [inner] = proc.children(p.pid)
        _wait(lambda: proc.mount_namespace(inner) == "other-root", "the new root to be in place")
        r = cli("checkpoint", "--pid", inner, "--out", tmp_path / "s")
        assert (r.returncode, r.stdout, r.stderr) == (1, "", (
            f"dynsnap checkpoint: cannot checkpoint pid {inner}: pid {inner} lives in a mount namespace with another "
            "root file system (a container's), which dynsnap does not checkpoint yet; start the worker with "
            "`dynsnap run` on the node\n"))
        assert not (tmp_path / "s").exists() and proc.state(inner) in ("S", "R")
    finally:
        if inner is not None:
            os.kill(inner, signal.SIGKILL)     # unshare's child: killing unshare alone would orphan it
        p.kill()
        p.wait()
        if inner is not None:
            _wait(lambda: _gone(inner), "the contained process to end")


def test_copies_side_by_side_with_an_abstract_socket(tmp_path, home, inits):
    """A worker holding a bound abstract UNIX socket (as every CUDA process does): the first copy keeps its
    name, a copy beside it gets a fresh name of the same length (the shared network namespace has one of each),
    and the snapshot's files are unchanged."""
    name = f"dynsnap-test-{os.getpid()}-uvm"
    init, sock = _run_worker(tmp_path, inits, "--abstract", name)
    assert request_json(sock, "check")["abstract"] == {"ok": True, "name": name}
    snap = tmp_path / "snap"
    r = cli("checkpoint", "--pid", init, "--out", snap)
    assert r.returncode == 0, r.stderr
    _wait(lambda: _gone(init), "the checkpointed tree to end")
    files_img = (snap / "criu" / "files.img").read_bytes()
    names = []
    for i in range(2):
        r = cli("restore", snap, "--json")
        assert r.returncode == 0, r.stderr
        inits.append(json.loads(r.stdout)["pid"])
        got = request_json(sock, "check")
        assert got["all_ok"], got
        names.append(got["abstract"]["name"])
        assert json.loads(r.stdout)["timings"].get("abstract_sockets_renamed", 0) == i
        os.rename(sock, tmp_path / f"copy{i}.sock")
    assert names[0] == name and names[1] != name and len(names[1]) == len(name)
    assert names[1].startswith(name[:len(name) - 12])
    assert (snap / "criu" / "files.img").read_bytes() == files_img
    r = cli("verify", snap)
    assert r.returncode == 0, r.stderr

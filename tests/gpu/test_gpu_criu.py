"""End to end on a GPU: `dynsnap checkpoint` / `dynsnap restore` of a torch worker through CRIU and the driver."""
from __future__ import annotations

import os

import pytest

from gpu_harness import alive, find_key, json_out, reap, run_cli, subreaper

pytestmark = [pytest.mark.gpu, pytest.mark.criu]


@pytest.fixture(autouse=True)
def _subreaper():
    subreaper()


@pytest.fixture
def restored():
    """Pids restored by a test: killed and reaped afterwards (they are our children through the subreaper)."""
    pids = []
    yield pids
    for pid in pids:
        if alive(pid):
            try:
                import dynsnap_core.cuda as cuda
                cuda.CudaTree([pid]).rollback()
            except Exception:  # noqa: BLE001
                pass
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            reap(pid)
        except Exception:  # noqa: BLE001
            pass


def _checkpoint(pid: int, out: str, *extra: str, env=None):
    r = run_cli("checkpoint", "--pid", str(pid), "--out", out, "--json", *extra, env=env)
    return r


def _restore(snap: str, restored: list) -> int:
    r = run_cli("restore", snap, "--json")
    assert r.returncode == 0, f"restore failed: {r.stderr[-3000:]}"
    out = json_out(r)
    pid = int(out["pid"])
    restored.append(pid)
    return pid


def test_checkpoint_kill_restore(worker, tmp_path, restored):
    import dynsnap_core.cuda as cuda
    h0, m0 = worker.request("hash"), worker.request("matmul")
    snap = str(tmp_path / "snap")
    r = _checkpoint(worker.pid, snap)
    assert r.returncode == 0, f"checkpoint failed: {r.stderr[-3000:]}"
    out = json_out(r)
    for key in ("lock", "gpu_checkpoint", "criu_dump"):
        assert find_key(out, key) is not None, f"no {key!r} timing in {out}"
    assert os.path.isdir(snap)
    worker.kill()                      # CRIU's dump stops it already; make sure, and free its pid
    pid = _restore(snap, restored)
    assert pid == worker.pid           # CRIU restores the same pid
    assert cuda.state(pid) is cuda.CudaState.RUNNING
    worker.pid = pid
    assert worker.wait_answer("ping") == "pong"
    assert worker.request("hash") == h0
    assert worker.request("matmul") == m0
    c = int(worker.request("count"))
    assert int(worker.wait_answer("count")) >= c


def test_checkpoint_leave_running_then_restore(worker, tmp_path, restored):
    import dynsnap_core.cuda as cuda
    h0, m0 = worker.request("hash"), worker.request("matmul")
    snap = str(tmp_path / "snap")
    r = _checkpoint(worker.pid, snap, "--leave-running")
    assert r.returncode == 0, f"checkpoint failed: {r.stderr[-3000:]}"
    assert alive(worker.pid)
    assert cuda.state(worker.pid) is cuda.CudaState.RUNNING
    assert worker.request("hash") == h0 and worker.request("matmul") == m0
    worker.kill()
    pid = _restore(snap, restored)
    worker.pid = pid
    assert worker.wait_answer("ping") == "pong"
    assert worker.request("hash") == h0 and worker.request("matmul") == m0


def test_dump_failure_keeps_worker_serving(worker, tmp_path):
    import dynsnap_core.cuda as cuda
    h0 = worker.request("hash")
    snap = str(tmp_path / "snap")
    r = _checkpoint(worker.pid, snap, env={"DYNSNAP_FAULT": "dump"})
    assert r.returncode != 0, "DYNSNAP_FAULT=dump must make the checkpoint fail"
    assert "Traceback" not in r.stderr
    assert not os.path.exists(snap)
    assert alive(worker.pid)
    assert cuda.state(worker.pid) is cuda.CudaState.RUNNING
    assert worker.request("ping") == "pong"
    assert worker.request("hash") == h0


def test_worker_in_its_own_pid_namespace(tmp_path, restored):
    """`dynsnap run` layout on a GPU: the worker (pid 2 of its own pid and mount namespaces, with its own /proc)
    initialises CUDA, the driver checkpoints it, and two copies of the snapshot restore side by side, each in
    a fresh namespace, each answering bit-exact with its own GPU memory."""
    import json
    import sys
    import time

    import dynsnap_core.cuda as cuda
    from dynsnap_core import proc
    from dynsnap_core.demo.worker import request
    from dynsnap_core.launch import launch
    from gpu_harness import WORKER, report_fact

    sock, ready, log = tmp_path / "w.sock", tmp_path / "ready", tmp_path / "w.log"
    init = launch([sys.executable, WORKER, "--gb", "1", "--sock", str(sock), "--ready", str(ready), "--seed", "77"],
                  log=log, cwd=tmp_path)
    restored.append(init)               # killed and reaped at the end: SIGKILL of the init ends its namespace
    deadline = time.monotonic() + 600
    while not ready.exists():
        assert alive(init) and time.monotonic() < deadline, f"worker did not start: {log.read_text()[-2000:]}"
        time.sleep(0.1)

    def ask(path, cmd: str) -> str:
        return request(str(path), cmd, 300, bufsize=65536)

    [worker] = proc.children(init)
    assert proc.mount_namespace(worker) == "own"
    assert ask(sock, "pid") == "2"      # the worker's own pid namespace, and a /proc that matches it
    h0, m0 = ask(sock, "hash"), ask(sock, "matmul")
    before = cuda.process_gpus(worker)
    snap = str(tmp_path / "snap")
    r = _checkpoint(init, snap)
    assert r.returncode == 0, f"checkpoint failed: {r.stderr[-3000:]}"
    m = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert m["pid_namespace"] is True and m["mount_namespace"] is True and m["cuda"]["pids"] == [worker]
    reap(init)
    copies = []
    for i in range(2):                  # the second copy restores while the first runs, from the same snapshot
        pid = _restore(snap, restored)
        assert pid != init and proc.pid_namespace_init(pid) and pid not in [c for c, _ in copies]
        [w] = proc.children(pid)
        assert cuda.state(w) is cuda.CudaState.RUNNING
        os.rename(sock, tmp_path / f"copy{i}.sock")   # its listening socket moves aside; the next copy binds anew
        copies.append((pid, w))
    for i, (pid, w) in enumerate(copies):
        path = tmp_path / f"copy{i}.sock"
        assert ask(path, "hash") == h0 and ask(path, "matmul") == m0 and ask(path, "pid") == "2"
    mem = {f"copy{i}": cuda.process_gpus(w) for i, (_, w) in enumerate(copies)}
    assert all(mem.values()), f"each copy holds GPU memory of its own: {mem}"
    report_fact("dynsnap run worker, two copies side by side", {"before_checkpoint": before, **mem})

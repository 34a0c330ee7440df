"""`dynsnap cuda-checkpoint` (NVIDIA cuda-checkpoint's flags) against the real driver."""
from __future__ import annotations

import pytest

from gpu_harness import run_cuda_cli

pytestmark = pytest.mark.gpu


def _state(pid: int) -> str:
    r = run_cuda_cli("--get-state", "--pid", str(pid))
    assert r.returncode == 0 and r.stderr == "", r
    return r.stdout.strip()


def test_toggle_twice(worker):
    h0 = worker.request("hash")
    assert _state(worker.pid) == "running"
    r = run_cuda_cli("--toggle", "--pid", str(worker.pid))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert _state(worker.pid) == "checkpointed"
    r = run_cuda_cli("--toggle", "-p", str(worker.pid))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert _state(worker.pid) == "running"
    assert worker.request("hash") == h0


def test_actions_one_by_one(worker):
    pid = str(worker.pid)
    r = run_cuda_cli("--get-restore-tid", "--pid", pid)
    assert r.returncode == 0 and int(r.stdout.strip()) > 0
    for action, after in (("lock", "locked"), ("checkpoint", "checkpointed"), ("restore", "locked"),
                          ("unlock", "running")):
        args = ["--action", action, "--pid", pid] + (["--timeout", "5000"] if action == "lock" else [])
        r = run_cuda_cli(*args)
        assert (r.returncode, r.stderr) == (0, ""), r
        assert _state(worker.pid) == after
    assert worker.request("ping") == "pong"


def test_wrong_state_is_one_line(worker):
    r = run_cuda_cli("--action", "checkpoint", "--pid", str(worker.pid))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"dynsnap cuda-checkpoint: process {worker.pid} is running, not locked: lock it first\n"

"""The GPU harness shared by tests/gpu and benches/bench_gpu.py: the torch worker, process reaping, CLI runners."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, List, Optional


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_torch.py")
PR_SET_CHILD_SUBREAPER = 36


def subreaper() -> None:
    """Make this process the child subreaper: a CRIU-restored worker is re-parented to us, and we reap it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pid: int, timeout: float = 30.0) -> None:
    """Wait for pid to exit and collect it if it is our child (directly or through the subreaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return
        except ChildProcessError:
            if not alive(pid):
                return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} did not exit within {timeout} s")


def nvidia_fds(pid: int) -> List[str]:
    out = []
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            out.append(target)
    return out


class Worker:
    """A running worker_torch.py: ``request(cmd)`` talks to it over its socket."""

    def __init__(self, gb: float, tmp: str, seed: int = 1234):
        self.gb = gb
        self.sock = "@dynsnap-gpu-" + uuid.uuid4().hex[:12]
        self.ready = os.path.join(tmp, f"ready-{uuid.uuid4().hex[:8]}")
        self.log = os.path.join(tmp, f"worker-{uuid.uuid4().hex[:8]}.log")
        logf = open(self.log, "w")
        # own session, stdio on /dev/null and a log file: nothing CRIU would call external
        self.proc = subprocess.Popen([sys.executable, WORKER, "--gb", str(gb), "--sock", self.sock,
                                      "--ready", self.ready, "--seed", str(seed)],
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=tmp)
        logf.close()
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 600.0) -> "Worker":
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready after {timeout} s: {self.tail()}")
            time.sleep(0.1)
        return self

    def tail(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def request(self, cmd: str, timeout: float = 300.0) -> str:
        from dynsnap_core.demo.worker import request   # the same line protocol as the demo worker
        reply = request("\0" + self.sock[1:], cmd, timeout, bufsize=65536)
        if reply.startswith("error"):
            raise RuntimeError(f"worker answered {reply!r} to {cmd!r}")
        return reply

    def wait_answer(self, cmd: str = "ping", timeout: float = 120.0) -> str:
        """Retry until the worker answers (e.g. right after a restore)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request(cmd, timeout=timeout)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap()

    def reap(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.wait(timeout=60)
                return
            except (ChildProcessError, subprocess.TimeoutExpired):
                pass
        reap(self.pid)


def run_cli(*args: str, env: Optional[dict] = None, timeout: float = 900.0) -> subprocess.CompletedProcess:
    """``python -m dynsnap_core.cli ARGS`` from the source tree."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "dynsnap_core.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def run_cuda_cli(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "dynsnap_core.cuda.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def json_out(r: subprocess.CompletedProcess) -> Any:
    """The JSON object a --json command printed on stdout (the whole of stdout), or a clear failure."""
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON in output (rc {r.returncode}): stdout={r.stdout[-2000:]!r} stderr={r.stderr[-2000:]!r}")


def find_key(obj: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in a nested JSON object, or None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            got = find_key(v, key)
            if got is not None:
                return got
    elif isinstance(obj, list):
        for v in obj:
            got = find_key(v, key)
            if got is not None:
                return got
    return None


def report_fact(what: str, value: Any) -> None:
    """A measured fact for the run's summary: one JSON line appended to $DYNSNAP_GPU_FACTS (gpu-check.sh sets it)."""
    line = json.dumps({"what": what, "value": value}, sort_keys=True)
    print(f"gpu fact: {line}")
    path = os.environ.get("DYNSNAP_GPU_FACTS")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")

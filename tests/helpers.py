"""Helpers shared by the test modules: run the real CLI, and self-checking workloads (import as `helpers`)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def cli(*args, env=None, timeout=300, user=None) -> subprocess.CompletedProcess:
    """Run `dynsnap ARGS` as a real subprocess."""
    cmd = [sys.executable, "-m", "dynsnap_core.cli", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def wait_ready(popen: subprocess.Popen, ready: Path, log: Path, what: str, timeout: float = 60) -> None:
    """Wait for a test process to write its ready file; RuntimeError ``what: <log tail>`` if it exits or times out."""
    end = time.monotonic() + timeout
    while not ready.exists():
        if popen.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{what}: {log.read_text()[-2000:]}")
        time.sleep(0.01)


def wait_until(cond, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def gone(pid: int, timeout: float = 10) -> bool:
    """Wait until ``pid`` no longer runs (a zombie counts as gone), reaping what is ours meanwhile."""
    from dynsnap_core.proc import exists, reap_children
    return wait_until(lambda: (reap_children(), not exists(pid))[1], timeout, 0.01)


def kill_proc(popen: subprocess.Popen) -> None:
    """SIGKILL a test process (gone already is fine) and wait up to 10 s for it to exit."""
    try:
        os.kill(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def request_json(sock: Path, what: str, timeout: float = 30) -> dict:
    """One request to a test workload's Unix socket (no newline); its JSON reply, read to the end."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(what.encode())
        buf = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            buf += part
    return json.loads(buf)


class Workload:
    """A zdtm-style process under test; talks over its Unix socket."""

    def __init__(self, tmp: Path, *flags: str):
        self.sock = tmp / f"w{time.monotonic_ns()}.sock"
        self.ready = tmp / f"w{time.monotonic_ns()}.ready"
        self.log = open(tmp / "workload.log", "ab")
        self.popen = subprocess.Popen(
            [sys.executable, str(HERE / "workloads" / "zdtm.py"), "--sock", str(self.sock),
             "--ready", str(self.ready), *flags],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        self.pid = self.popen.pid
        wait_ready(self.popen, self.ready, tmp / "workload.log", "workload failed to start")
        from dynsnap_core.proc import tree
        self.tree_pids = tree(self.pid)

    def request(self, what: str = "check", timeout: float = 30) -> dict:
        return request_json(self.sock, what, timeout)

    def alive(self) -> bool:
        from dynsnap_core.proc import exists
        return exists(self.pid)

    def state(self) -> str | None:
        from dynsnap_core.proc import state
        return state(self.pid)

    def reap_original(self) -> None:
        """The original tree must be reaped so that a restore can take its pids back: the root is our child,
        its children were re-parented to us (the test runner is a subreaper)."""
        from dynsnap_core.proc import reap_children
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + 10
        while time.monotonic() < end:
            reap_children()
            if not any(os.path.exists(f"/proc/{p}") for p in self.tree_pids):
                return
            time.sleep(0.01)

    def kill(self) -> None:
        kill_proc(self.popen)
        from dynsnap_core.proc import reap_children
        time.sleep(0.05)
        reap_children()
        self.log.close()


def write_manifest(snapshot: Path, m: dict) -> None:
    """Rewrite a snapshot's manifest.json as dynsnap would (sealed with a fresh root digest): for tests that
    change what a manifest says on purpose, not to damage it."""
    from dynsnap_core.snapshot import manifest as mf
    (snapshot / "manifest.json").write_text(json.dumps(mf.seal(m), indent=2, sort_keys=True))


def fail_line(r: subprocess.CompletedProcess, cmd: str) -> str:
    """The one error sentence of a failed `dynsnap CMD` (exit 1, no traceback); progress lines ("  phase: 2.1 s",
    printed for long phases) and notes ("note: ...") are allowed around it."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("  ", "note: "))]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"dynsnap {cmd}: "), r.stderr
    return lines[0][len(f"dynsnap {cmd}: "):]


class PageWorker:
    """tests/workloads/pagecheck.py: random memory with a CRC per page (lazy restore and the restore benchmark)."""

    def __init__(self, tmp: Path, mb: int):
        self.sock, ready, log = tmp / "pc.sock", tmp / "pc.ready", tmp / "pc.log"
        with open(log, "ab") as lf:
            self.popen = subprocess.Popen([sys.executable, str(HERE / "workloads" / "pagecheck.py"), "--sock",
                                           str(self.sock), "--ready", str(ready), "--mb", str(mb)],
                                          stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, start_new_session=True)
        self.pid = self.popen.pid
        wait_ready(self.popen, ready, log, "pagecheck workload failed to start")

    def ask(self, what: str) -> dict:
        return request_json(self.sock, what, timeout=120)

    def reap_original(self) -> None:
        self.popen.wait(timeout=30)

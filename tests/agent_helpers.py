"""Test helpers for the node agent: start a real `dynsnap agent` process and talk to it over its Unix socket or TCP."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

from helpers import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    """`dynsnap agent` as a subprocess with its own home; ``client`` speaks HTTP over its socket."""

    def __init__(self, home: Path, sock: Path, *args: str, env: Optional[dict] = None, log: Optional[Path] = None):
        self.home, self.sock, self.args = home, sock, args
        self.env = {**os.environ, "DYNSNAP_HOME": str(home), **(env or {})}
        self.log_path = log or home.parent / f"agent-{time.monotonic_ns()}.log"
        self.popen: Optional[subprocess.Popen] = None
        self.client: Optional[httpx.Client] = None

    def start(self, timeout: float = 60) -> "AgentProc":
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "agent", "--socket", str(self.sock),
                                       *self.args], stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                      env=self.env, cwd=ROOT)
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://agent",
                                   timeout=120)
        end = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"agent exited with {self.popen.returncode}: {self.log()}")
            if self._listening() and self.client.get("/healthz").status_code == 200:
                return self
            if time.monotonic() > end:
                raise RuntimeError(f"agent did not answer: {self.log()}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        """The socket accepts connections (probed with a plain socket: httpx leaks one on a refused connect)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""

    def wait_job(self, job_id: str, timeout: float = 120) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}", params={"wait": timeout, "events": True}, timeout=timeout + 30)
        assert r.status_code == 200, r.text
        return r.json()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        if self.client is not None:
            self.client.close()
            self.client = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


class MotoServer:
    """moto's standalone S3-compatible server on a free loopback port (a real HTTP server, state in memory)."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        end = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.popen.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
        self._log.close()


class FaultProxy:
    """A TCP proxy in front of a server that can stall after N bytes in one direction, then cut every connection
    and refuse new ones: the object store failing in the middle of a transfer, for real."""

    def __init__(self, target_port: int):
        import threading
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.limit: dict[str, Optional[int]] = {"up": None, "down": None}
        self.count = {"up": 0, "down": 0}
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._cut = False
        self._threads: list = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def stall_after(self, direction: str, nbytes: int) -> None:
        """Stop forwarding ``direction`` ('up' = to the server, 'down' = to the client) after ``nbytes`` more."""
        with self._lock:
            self.limit[direction] = self.count[direction] + nbytes

    def _accept(self) -> None:
        import threading
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self._lock:
                if self._cut:
                    c.close()
                    s.close()
                    return
                self._conns += [c, s]
            for src, dst, d in ((c, s, "up"), (s, c, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, d), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                lim = self.limit[direction]
                if lim is not None and self.count[direction] + len(data) > lim:
                    self.stalled.set()
                    stall = True
                else:
                    self.count[direction] += len(data)
                    stall = False
            if stall:
                while not self._cut:       # hold the bytes until the test cuts the connections
                    time.sleep(0.01)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        """Close every connection (mid-transfer) and stop accepting: the store is gone."""
        with self._lock:
            self._cut = True
            conns, self._conns = self._conns, []
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []

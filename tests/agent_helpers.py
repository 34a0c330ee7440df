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

"""A guardian that puts a frozen source tree back to work if dynsnap itself is killed mid-checkpoint.

`dynsnap checkpoint` starts it (in its own session) before freezing anything and talks to it over a pipe; ``--pids``
are the processes to continue (not those its user had stopped). When
dynsnap finishes it writes ``done``; if the pipe closes without that line, dynsnap died (SIGKILL, OOM): the
guardian waits until CRIU has ended (dynsnap names its process before CRIU may start) and no longer traces the
tree, then continues it and, for CUDA processes, restores and unlocks their GPU state. Run as
``python -m dynsnap_core.guardian --pids 1,2``; it reads ``cuda PIDS``, ``criu PID`` and ``done`` lines on stdin.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .proc import exists

__all__ = ["Guardian"]


class Guardian:
    """Parent side: start before freezing, ``done()`` when the tree's fate is settled."""

    def __init__(self, pids: list[int], journal: Optional[Path] = None):
        self._proc: Optional[subprocess.Popen] = None
        cmd = [sys.executable, "-m", "dynsnap_core.guardian", "--pids", ",".join(map(str, pids))]
        if journal is not None:
            cmd += ["--journal", str(journal)]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        except OSError:
            self._proc = None          # best effort: without it a SIGKILL of dynsnap leaves the tree stopped

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def cuda(self, cuda_pids: list[int]) -> None:
        self._send(f"cuda {','.join(map(str, cuda_pids))}")

    def criu(self, pid: int) -> None:
        """CRIU's pid, sent before CRIU may start (Criu.run's gate): after a death of dynsnap the guardian waits
        for that process to end, so that it never continues a tree that CRIU is about to freeze or is dumping."""
        self._send(f"criu {pid}")

    def _send(self, line: str) -> None:
        if self._proc and self._proc.stdin:
            try:
                self._proc.stdin.write((line + "\n").encode())
                self._proc.stdin.flush()
            except OSError:
                pass

    def done(self) -> None:
        if self._proc is None:
            return
        self._send("done")
        try:
            if self._proc.stdin:
                self._proc.stdin.close()
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _traced(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1]) != 0
    except OSError:
        return False
    return False


def _rescue(pids: list[int], cuda_pids: list[int], criu_pids: list[int]) -> None:
    end = time.monotonic() + 600
    # CRIU still at work (or about to seize the tree): let it finish first
    while time.monotonic() < end and (any(exists(c) for c in criu_pids) or any(_traced(p) for p in pids)):
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGCONT)
        except ProcessLookupError:
            pass
    if cuda_pids:
        from .cuda import CudaTree
        CudaTree(cuda_pids).rollback()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pids", required=True)
    ap.add_argument("--journal", help="the tree's journal entry, removed once the tree runs again")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pids = [int(x) for x in a.pids.split(",") if x]
    cuda_pids: list[int] = []
    criu_pids: list[int] = []
    for raw in sys.stdin.buffer:
        line = raw.decode().strip()
        if line == "done":
            return 0
        if line.startswith("cuda "):
            cuda_pids = [int(x) for x in line[5:].split(",") if x]
        elif line.startswith("criu "):
            criu_pids.append(int(line[5:]))
    _rescue(pids, cuda_pids, criu_pids)
    if a.journal:
        try:
            os.unlink(a.journal)        # settled: the next dynsnap command has nothing to continue
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

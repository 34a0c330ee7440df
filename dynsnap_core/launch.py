"""Start a worker so that its snapshots restore anywhere: in its own pid and mount namespaces, in its own session.

A plain snapshot restores with its original pids, which must be free on the target node, and only once at a
time. A worker started by ``launch`` (``dynsnap run -- CMD``) runs as pid 2 of a new pid namespace under a
small init (nsinit.py, pid 1); CRIU dumps the namespace with it and restore creates a fresh one, so the
snapshot restores whatever pids the node has in use, and several copies can run side by side (each needs its
own listening addresses). The checkpoint target is the init's pid as seen from outside, which ``launch``
returns.

The worker also gets a mount namespace: a private copy of the node's mounts at start, with a /proc of its own
pid namespace in place of the node's (what a container gives it, and what the CUDA driver needs: it fails
cuInit with error 304 when /proc belongs to another pid namespace). Every other mount is the node's own file
system (the same /dev/shm, /tmp, /dev): CRIU records those as external mounts and binds the node's at restore,
so nothing of them enters the snapshot. Mounts made on the node after the start are not seen by the worker.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .errors import DynsnapError

__all__ = ["launch", "NSINIT"]

NSINIT = Path(__file__).with_name("nsinit.py")


def launch(cmd: Sequence[str], *, log: Optional[str | os.PathLike] = None, cwd: Optional[str | os.PathLike] = None,
           env: Optional[Mapping[str, str]] = None, timeout: float = 30.0) -> int:
    """Start ``cmd`` detached in a new pid namespace and session; return the pid to checkpoint (its init).

    stdin is /dev/null, stdout and stderr go to ``log`` (appended; default /dev/null). Raises
    ``DynsnapError`` with one sentence when ``cmd`` is empty or cannot be executed, ``cwd`` or ``log``
    cannot be used, or the namespace cannot be created.
    """
    cmd = [os.fspath(c) for c in cmd]
    if not cmd:
        raise DynsnapError("nothing to run: give a command after --", stage="run")
    unshare, setsid = shutil.which("unshare"), shutil.which("setsid")
    if not unshare or not setsid:
        raise DynsnapError("dynsnap run needs unshare and setsid (util-linux) on PATH", stage="run")
    if cwd is not None and not os.path.isdir(cwd):
        raise DynsnapError(f"no such directory for the worker: {cwd}", stage="run")
    logarg = []
    if log is not None:
        log = os.path.abspath(log)
        try:
            open(log, "ab").close()
        except OSError as e:
            raise DynsnapError(f"cannot open the log {log}: {e.strerror}", stage="run") from None
        logarg = ["--log", log]
    r, w = os.pipe()
    try:
        # setsid --fork: the process we wait for exits at once; unshare runs on, orphaned, as the namespace's
        # parent (a long-lived orchestrator collects no zombie), and the status pipe crosses both execs
        p = subprocess.Popen([setsid, "--fork", unshare, "--pid", "--mount", "--propagation", "private", "--fork",
                              sys.executable, "-I", "-S", str(NSINIT), "--own-proc", "--status-fd", str(w),
                              *logarg, "--", *cmd],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             pass_fds=(w,),
                             cwd=cwd, env=dict(env) if env is not None else None)
        os.close(w)
        w = -1
        p.wait()
        status = _read_status(r, timeout)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if status.startswith("ok "):
        return int(status.split()[1])
    if status.startswith("error "):
        raise DynsnapError(status[6:], stage="run")
    if os.geteuid() != 0:
        raise DynsnapError("run needs root (CAP_SYS_ADMIN) to create the worker's pid namespace; run dynsnap with "
                           "sudo", stage="run")
    raise DynsnapError(f"the pid and mount namespaces for {cmd[0]} could not be set up (unshare --pid --mount "
                       f"failed; is this a container without CAP_SYS_ADMIN?)", stage="run")


def _read_status(fd: int, timeout: float) -> str:
    """The status line nsinit writes (empty when the pipe closed without one)."""
    data, end = b"", time.monotonic() + timeout
    while b"\n" not in data:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise DynsnapError(f"the worker's init did not report within {timeout:.0f} s", stage="run")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()

"""The journal of frozen trees: every tree a checkpoint may leave stopped is on record until its fate is settled.

`dynsnap checkpoint` writes an entry before it freezes anything (the tree's pids with their start times, which of
them to continue, the CUDA processes, and later CRIU's pid) and removes it once the tree runs again or was
killed after a committed snapshot. The guardian continues the tree when dynsnap alone dies; if dynsnap *and* its
guardian die together (a container or cgroup kill), the entry outlives them both, and the next dynsnap command
(every command calls ``recover()``) continues the tree: once the owner is gone, no CRIU of the entry is alive and
nothing traces the tree. Start times guard against reused pids: a process is touched only if it is the one
recorded. Entries live in ``$DYNSNAP_RUN_DIR`` (default ``/run/dynsnap`` as root), a tmpfs that a reboot clears
along with the pids it names.

Restores have entries too (``restoring/``): the restore supervisor (dynsnap_core/supervise.py) records every
process below it while CRIU runs; if dynsnap and the supervisor die together, ``recover()`` kills exactly those
processes (pid and start time), so nothing half-restored stays. Per-process checkpoint locks live in ``locks/``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

from . import proc
from .config import run_dir
from .durable import write_atomic

__all__ = ["run_dir", "Entry", "TreeLock", "recover", "traced_by", "restore_entry"]




def _frozen_dir() -> Path:
    return run_dir() / "frozen"


def _ident(pid: int) -> Optional[list[int]]:
    st = proc.start_time(pid)
    return None if st is None else [pid, st]


_same = proc.same_process


class Entry:
    """One tree on record; ``settle()`` when its fate is decided. Best effort: without a writable run dir the
    guardian alone protects the tree."""

    def __init__(self, pids: list[int], resume: list[int]):
        self.path: Optional[Path] = None
        self.data = {"owner": _ident(os.getpid()), "pids": [x for x in (_ident(p) for p in pids) if x],
                     "resume": resume, "cuda": [], "criu": [], "staging": [], "guardian": None}
        d = _frozen_dir()
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.path = d / f"{os.getpid()}-{self.data['owner'][1] if self.data['owner'] else 0}.json"
            self._write()
        except OSError:
            self.path = None

    def _write(self) -> None:
        if self.path is None:
            return
        write_atomic(self.path, json.dumps(self.data).encode(), tmp=self.path.with_suffix(".tmp"), mode=0o600,
                     durable=False)

    def cuda(self, pids: list[int]) -> None:
        self.data["cuda"] = list(pids)
        self._update()

    def guardian(self, pid: Optional[int]) -> None:
        """The guardian's pid: while it lives, the tree is its to continue."""
        if pid is not None:
            self.data["guardian"] = _ident(pid)
            self._update()

    def staging(self, path: Path) -> None:
        """A staging directory of this checkpoint: removed by ``recover`` if the checkpoint dies."""
        self.data["staging"].append(str(path))
        self._update()

    def criu(self, pid: int) -> None:
        ident = _ident(pid)
        if ident:
            self.data["criu"].append(ident)
            self._update()

    def _update(self) -> None:
        try:
            self._write()
        except OSError:
            pass

    def settle(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            self.path = None


def traced_by(pid: int) -> int:
    """The pid tracing pid (a debugger, CRIU), or 0."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _traced(pid: int) -> bool:
    return traced_by(pid) != 0


def restore_entry() -> Optional[Path]:
    """Where a restore's supervisor keeps its record (None without a writable run dir)."""
    d = run_dir() / "restoring"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return None
    me = _ident(os.getpid())
    return d / f"{os.getpid()}-{me[1] if me else 0}-{time.monotonic_ns()}.json"


def _finished_root(pidfile: object, sup: list) -> Optional[int]:
    """The root of a tree CRIU restored for a dead restore: the pid in its pidfile, if that process started after
    the supervisor and is still stopped (CRIU's --leave-stopped); None otherwise."""
    if not isinstance(pidfile, str):
        return None
    try:
        root = int(Path(pidfile).read_text().strip())
        since = int(sup[1])
    except (OSError, ValueError, TypeError, IndexError):
        return None
    start = proc.start_time(root)
    if start is None or start < since or not proc.exists(root) or proc.state(root) not in ("T", "t"):
        return None
    return root


def _recover_restores() -> list[int]:
    """Kill what restores left behind when dynsnap and its supervisor died together, once neither is alive: the
    recorded processes (pid and start time) with whatever they forked since the last record (a CRIU still at
    work), and the tree CRIU finished after they died (its root named in CRIU's pidfile, started after the
    supervisor, still stopped as CRIU leaves it)."""
    killed: list[int] = []
    try:
        files = sorted((run_dir() / "restoring").glob("*.json"))
    except OSError:
        return killed
    for f in files:
        try:
            data = json.loads(f.read_text())
            owner, sup, procs = data["owner"], data["supervisor"], data["procs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _same(owner) or _same(sup):
            continue                      # still restoring, or its supervisor will clean up itself
        victims: list[int] = []
        for rec in procs:
            if _same(rec):
                victims += proc.tree(int(rec[0]))
        root = _finished_root(data.get("pidfile"), sup)
        if root is not None:
            victims += proc.tree(root)
        for pid in dict.fromkeys(victims):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        try:
            f.unlink()
        except OSError:
            pass
    return killed


def recover(path: Optional[Path] = None) -> list[int]:
    """Continue the trees of dead checkpoints (owner gone, no CRIU of theirs alive, nothing tracing them); return
    the pids continued. ``path`` limits it to one entry (the guardian's own)."""
    d = _frozen_dir()
    try:
        files = [path] if path is not None else sorted(d.glob("*.json"))
    except OSError:
        return []
    done: list[int] = []
    for f in files:
        try:
            data = json.loads(f.read_text())
            owner, pids, resume = data["owner"], data["pids"], set(data["resume"])
            criu, cuda_pids = data["criu"], data["cuda"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if path is None and owner and _same(owner):
            continue                      # its checkpoint is still running
        if any(_same(c) for c in criu):
            continue                      # CRIU still at work: the next command will look again
        if path is None and data.get("guardian") and _same(data["guardian"]):
            continue                      # its guardian is alive and will continue the tree itself
        live = [int(r[0]) for r in pids if _same(r)]
        if any(_traced(p) for p in live):
            continue
        for p in live:
            if p in resume:
                try:
                    os.kill(p, signal.SIGCONT)
                    done.append(p)
                except ProcessLookupError:
                    pass
        for st in data.get("staging") or []:
            # only dynsnap's own staging names (hidden .NAME.dynsnap-staging.PID or dynsnap-dump-PID.START-*)
            name = os.path.basename(str(st))
            if owner and (name.endswith(f".dynsnap-staging.{owner[0]}") or name.startswith(
                    f"dynsnap-dump-{owner[0]}.")):
                shutil.rmtree(st, ignore_errors=True)
        if cuda_pids:
            try:
                from .cuda import CudaTree
                CudaTree([p for p in cuda_pids if p in live]).rollback()
            except Exception:  # noqa: BLE001 - best effort: the tree runs again either way
                pass
        try:
            f.unlink()
        except OSError:
            pass
    if path is None:
        _recover_restores()
        from . import thp_scope
        thp_scope.recover()              # a restore killed while it held THP at `always`: the host's mode back
        try:
            for lock in (run_dir() / "locks").glob("*.lock"):
                if not _same(lock.stem.split("-")):      # its process is gone: nobody locks it again
                    lock.unlink()
        except OSError:
            pass
    return done


class TreeLock:
    """Exclusive per-process locks (flock on ``run_dir()/locks/PID-START``) held while a checkpoint works on a tree:
    a second checkpoint of any process of it is refused with one sentence instead of fighting CRIU over it."""

    def __init__(self, pids: list[int]):
        import fcntl
        self._fds: list[int] = []
        d = run_dir() / "locks"
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return                         # best effort, like the journal
        try:
            for p in sorted(set(pids)):
                ident = _ident(p)
                if ident is None:
                    continue
                path = d / f"{ident[0]}-{ident[1]}.lock"
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    from .errors import InvalidTarget
                    raise InvalidTarget(
                        f"another checkpoint of this tree is running (pid {p} is being checkpointed"
                        + (f" by dynsnap pid {holder}" if holder.isdigit() else "") + "); wait for it to finish",
                        stage="preflight", pid=p)
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._fds.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

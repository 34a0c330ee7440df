"""Facts about live processes read from /proc: existence, tree, command line, memory, sessions."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

from .errors import InvalidTarget, ProcessNotFound

__all__ = ["exists", "tree", "cmdline", "comm", "rss_bytes", "session_id", "validate_target",
           "state", "wait_stopped", "unsupported_resources", "set_child_subreaper", "reap_children",
           "ns_ids", "pid_namespace_init", "mount_namespace", "start_time", "tgid", "PID_MAX"]

PID_MAX = 4194304          # PID_MAX_LIMIT: no Linux pid is larger


def same_process(rec: list) -> bool:
    """The recorded [pid, start time] is still that very process (alive, not a zombie)."""
    try:
        pid, start = int(rec[0]), int(rec[1])
    except (TypeError, ValueError, IndexError):
        return False
    return start_time(pid) == start and exists(pid)


def exists(pid: int) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return state(pid) not in ("Z", "X", None)


def state(pid: int) -> Optional[str]:
    """One-letter state from /proc/PID/stat (R, S, T, Z...), or None when gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2]


def _stat_fields(pid: int) -> list[str]:
    data = Path(f"/proc/{pid}/stat").read_text()
    return data[data.rindex(")") + 2:].split()


def _stat_int(pid: int, field: int) -> Optional[int]:
    """/proc/PID/stat field ``field + 3`` (counted after the command name) as an int, None if unreadable."""
    try:
        return int(_stat_fields(pid)[field])
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> Optional[int]:
    """When pid started (clock ticks since boot, /proc/PID/stat field 22): with the pid, names one process for good."""
    return _stat_int(pid, 19)


def tgid(pid: int) -> Optional[int]:
    """The process (thread group) that pid belongs to: pid itself unless pid is a thread id."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def session_id(pid: int) -> int:
    return int(_stat_fields(pid)[3])


def ns_ids(pid: int | str, key: str = "NSpid") -> list[int]:
    """pid's ids in each pid namespace from /proc's down to its own (``NSpid``, ``NSsid``, ``NSpgid``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _own_depth() -> int:
    """How many pid namespaces /proc shows for the caller (1: the caller lives in /proc's own)."""
    return max(1, len(ns_ids("self")))


def pid_namespace_init(pid: int) -> bool:
    """Whether pid is pid 1 of a pid namespace nested below the caller's (``dynsnap run``'s layout)."""
    ids = ns_ids(pid)
    return len(ids) > _own_depth() and ids[-1] == 1


def mount_namespace(pid: int) -> Optional[str]:
    """How pid's mount namespace relates to the caller's: None (the same one), "own" (another one, over the same
    root file system: ``dynsnap run``'s layout), or "other-root" (another root file system: a container)."""
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            return None
        theirs, ours = os.stat(f"/proc/{pid}/root/"), os.stat("/")
    except OSError:
        return None
    return "own" if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) else "other-root"


def _namespace_init_of(pid: int) -> Optional[int]:
    """For a process inside a nested pid namespace: that namespace's init, as a pid of ours."""
    depth = len(ns_ids(pid))
    while pid > 1:
        ids = ns_ids(pid)
        if len(ids) != depth:
            return None
        if ids[-1] == 1:
            return pid
        pp = parent(pid)
        if pp is None:
            return None
        pid = pp
    return None


def parent(pid: int) -> Optional[int]:
    return _stat_int(pid, 1)


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def tree(pid: int) -> list[int]:
    """pid and all its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children(p)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def rss_bytes(pid: int) -> int:
    """Resident set (anon + file + shmem) of one process, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def validate_target(pid: int) -> None:
    """Refuse pids that must never be frozen, with one sentence each."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ProcessNotFound(f"invalid pid {pid!r}: a pid is a positive integer", stage="preflight", pid=None)
    if pid > PID_MAX:
        raise ProcessNotFound(f"no such process: {pid} (Linux pids are at most {PID_MAX})", stage="preflight",
                              pid=None)
    if pid == 1:
        raise InvalidTarget("refusing to checkpoint pid 1 (init): it would freeze the whole system",
                            stage="preflight", pid=pid)
    if pid == os.getpid() or pid in _ancestors(os.getpid()):
        raise InvalidTarget(f"refusing to checkpoint pid {pid}: it is dynsnap itself or one of its parents",
                            stage="preflight", pid=pid)
    if not exists(pid):
        raise ProcessNotFound(f"no such process: {pid}", stage="preflight", pid=pid)
    leader = tgid(pid)
    if leader is not None and leader != pid:
        raise InvalidTarget(f"pid {pid} is a thread of process {leader}, not a process; checkpoint pid {leader}",
                            stage="preflight", pid=pid)
    if not cmdline(pid) and not Path(f"/proc/{pid}/exe").exists():
        raise InvalidTarget(f"pid {pid} is a kernel thread; only user processes can be checkpointed",
                            stage="preflight", pid=pid)


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            pid = int(_stat_fields(pid)[1])
        except (OSError, IndexError, ValueError):
            break
        out.append(pid)
    return out


# fd targets that CRIU cannot checkpoint, with what to tell the user.
_UNSUPPORTED_FDS = {
    "anon_inode:[io_uring]": "an io_uring instance, which CRIU cannot checkpoint; close the ring first",
}


def unsupported_resources(pids: list[int]) -> list[str]:
    """Sentences naming resources in these processes that a checkpoint cannot handle (checked before freezing)."""
    found = []
    own_depth = _own_depth()
    for pid in pids:
        inner = ns_ids(pid, "NSsid")        # the session as the process sees it, in its own pid namespace
        if inner:
            sid: Optional[int] = inner[-1]
        else:                               # a kernel without NS* lines: the session as /proc shows it
            try:
                sid = session_id(pid)
            except (OSError, IndexError, ValueError):
                sid = None
        ids = ns_ids(pid)
        if pid == pids[0] and len(ids) > own_depth and ids[-1] != 1:
            init = _namespace_init_of(pid)
            found.append(f"pid {pid} is pid {ids[-1]} of a pid namespace, and CRIU dumps a pid namespace from its "
                         f"init: checkpoint " + (f"pid {init} instead" if init else "the namespace's init instead"))
            continue
        if pid == pids[0] and mount_namespace(pid) == "other-root":
            found.append(f"pid {pid} lives in a mount namespace with another root file system (a container's), "
                         f"which dynsnap does not checkpoint yet; start the worker with `dynsnap run` on the node")
            continue
        if sid == 0:
            found.append(f"pid {pid} belongs to a session whose leader is outside its pid namespace (it was started "
                         f"from a parent namespace, as `docker exec` or `nsenter` do), which CRIU cannot checkpoint; "
                         f"start the worker with `setsid` so that it leads its own session")
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            what = _UNSUPPORTED_FDS.get(target)
            if what:
                found.append(f"pid {pid} holds {what} (fd {fd})")
    return found


def has_tty(pid: int) -> bool:
    """Whether stdin, stdout or stderr of pid is a terminal."""
    for fd in (0, 1, 2):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/dev/pts/", "/dev/tty")):
            return True
    return False


def wait_stopped(pids: list[int], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(state(p) in ("T", "t", None) for p in pids):
            return
        time.sleep(0.005)


def set_child_subreaper() -> None:
    """Make this process adopt orphaned descendants (CRIU-restored trees are re-parented)."""
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def reap_children() -> list[tuple[int, int]]:
    """waitpid(-1, WNOHANG) until nothing is left to reap; returns (pid, status) pairs."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def kill_tree(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_and_reap(pids: list[int], timeout: float = 10.0) -> bool:
    """SIGKILL ``pids`` in the order given and wait until none of them is left in /proc, reaping what is ours
    (directly, or as the subreaper of a restored tree) meanwhile. True once all are gone."""
    kill_tree(pids)
    end = time.monotonic() + timeout
    while True:
        reap_children()
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)

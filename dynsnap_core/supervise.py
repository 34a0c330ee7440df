"""The restore supervisor: runs CRIU as a child subreaper, so that CRIU and the tree it restores die with a failed restore.

dynsnap starts it as ``python -I -S supervise.py --control R --report W [--journal PATH] -- criu restore ...`` (stdlib only: it
starts in milliseconds). It makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so every process CRIU forks
that loses its parent, above all the restored tree once CRIU exits, becomes its child and stays findable. It
reports ``exit STATUS`` on the report fd when CRIU ends, then waits on the control fd for one word:

- ``release``: the restore is complete (verified, continued): exit and leave the tree to the system.
- ``kill``, or end of file (dynsnap died, even by SIGKILL): SIGKILL CRIU and every descendant, reap them, exit.

So no CRIU and no half-restored process outlives a restore that did not complete, whatever ended dynsnap. With
``--journal`` it also keeps a record of every process below it (pid and start time), so that if it is killed
together with dynsnap, the next dynsnap command kills those (dynsnap_core.journal.recover).
SIGINT and SIGHUP are ignored (a Ctrl-C is dynsnap's to handle); SIGTERM means ``kill``.

Lazy restore (dynsnap_core/lazy_pages.py): with ``--daemon JSON_ARGV --daemon-socket PATH`` it first starts CRIU's
lazy-pages daemon and starts CRIU only once the daemon listens (reported as ``daemon PID``); a third control word,
``handover``, means: the tree runs, dynsnap may go; keep the tree until the daemon has every page in, then
release it (``filled``, and remove ``--cleanup DIR``), or kill it and everything else if the daemon fails or
outlives ``--fill-timeout`` seconds (``fill-failed STATUS``): a page the daemon never copied would read as zeros.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[int]:
    kids: list[int] = []
    me = os.getpid()
    try:
        tids = os.listdir(f"/proc/{me}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def _descendants() -> list[int]:
    out, todo = [], _children()
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _reap() -> bool:
    """Reap every exited child; False once no child is left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def kill_all(deadline_s: float = 30.0) -> None:
    """SIGKILL every descendant (orphans come back to us as the subreaper) until none is left."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for p in _descendants():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not _reap():
            return
        time.sleep(0.005)


_OPTIONS = ("--journal", "--daemon", "--daemon-socket", "--fill-timeout", "--cleanup")


def main(argv: list[str]) -> int:
    opts: dict[str, str] = {}
    rest = argv[4:]
    while len(rest) >= 2 and rest[0] in _OPTIONS:
        opts[rest[0]] = rest[1]
        rest = rest[2:]
    argv = argv[:4] + rest
    journal = opts.get("--journal")
    if len(argv) < 6 or argv[0] != "--control" or argv[2] != "--report" or argv[4] != "--":
        sys.stderr.write("usage: supervise.py --control FD --report FD [--journal PATH] -- CMD [ARG ...]\n")
        return 2
    control, report, cmd = int(argv[1]), int(argv[3]), argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(report, f"error prctl: {os.strerror(ctypes.get_errno())}\n".encode())
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    # CRIU writes the restored root's pid there once the tree exists: a tree CRIU finished after we died is found
    pidfile = cmd[cmd.index("--pidfile") + 1] if "--pidfile" in cmd[:-1] else None
    book = _Book(journal, pidfile)
    lazy = None
    if "--daemon" in opts:
        lazy = _Lazy(json.loads(opts["--daemon"]), opts["--daemon-socket"], float(opts.get("--fill-timeout", 3600)),
                     opts.get("--cleanup"))
        try:
            started = lazy.start(control, report, stop, book)
        except BaseException:          # dynsnap gone (EPIPE on the report pipe), or anything else: nothing stays
            started = False
        if not started:
            kill_all()
            book.close()
            return 1
    try:
        child = os.fork()
    except OSError as e:
        kill_all()
        book.close()
        os.write(report, f"error fork: {e.strerror}\n".encode())
        return 1
    if child == 0:
        try:
            os.close(control)
            os.close(report)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execv(cmd[0], cmd)
        except OSError as e:
            os.write(2, f"cannot run {cmd[0]}: {e.strerror}\n".encode())
        os._exit(127)
    released = False
    try:
        released = _serve(child, control, report, stop, book, lazy)
    finally:
        if not released:               # whatever went wrong here (dynsnap gone: EPIPE), nothing may outlive us
            kill_all()
        book.close()
    return 0


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data[data.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class _Book:
    """The journal entry of this restore (dynsnap_core.journal reads it): every process below us, with its start
    time, kept current while CRIU runs. If dynsnap and this supervisor are killed together, the next dynsnap
    command kills exactly those processes. Removed once the restore is released or everything is killed."""

    def __init__(self, path: str | None, pidfile: str | None = None):
        self.path, self.pidfile = path, pidfile
        self.owner = os.getppid()
        self.seen: dict[int, int] = {}
        self.update()

    def update(self) -> None:
        if self.path is None:
            return
        now = {p: t for p in _descendants() if (t := _start_time(p)) is not None}
        if all(self.seen.get(p) == t for p, t in now.items()) and self.seen:
            return
        self.seen.update(now)
        me = os.getpid()
        body = json.dumps({"owner": [self.owner, _start_time(self.owner)], "supervisor": [me, _start_time(me)],
                           "procs": [[p, t] for p, t in sorted(self.seen.items())], "pidfile": self.pidfile})
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, body.encode())
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            pass

    def close(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _report(fd: int, line: str) -> None:
    os.write(fd, line.encode() + b"\n")           # EPIPE once dynsnap is gone: the caller kills everything


def _serve(child: int, control: int, report: int, stop: list, book: "_Book", lazy: "_Lazy | None" = None) -> bool:
    """Report CRIU's end, obey the control word; True only for ``release`` (or ``handover`` and a complete fill)."""
    _report(report, f"started {child}")
    criu_done = False
    try:                                   # readable when CRIU exits: its end is reported at once, not at the next tick
        exited = [os.pidfd_open(child)]
    except (AttributeError, OSError):
        exited = []
    buf = b""
    while True:
        if stop:
            return False
        book.update()
        if not criu_done:
            try:
                pid, status = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pid, status = child, 255 << 8
            if pid == child:
                criu_done = True
                _report(report, f"exit {os.waitstatus_to_exitcode(status)}")
                for fd in exited:
                    os.close(fd)
                exited = []
        try:
            ready, _, _ = select.select([control, *exited], [], [], 0.02)
        except InterruptedError:
            continue
        if control in ready:
            data = os.read(control, 64)
            if not data:                       # dynsnap is gone without a word: nothing it restored may stay
                return False
            buf += data
            if b"kill" in buf:
                return False
            if lazy is not None and b"handover" in buf:
                return lazy.until_filled(control, report, stop, book)
            if b"release" in buf:
                return True


class _Lazy:
    """CRIU's lazy-pages daemon for one restore: started before CRIU, watched until it has copied every page."""

    def __init__(self, argv: list, socket_path: str, fill_timeout: float, cleanup: str | None):
        self.argv, self.socket, self.fill_timeout, self.cleanup = argv, socket_path, fill_timeout, cleanup
        self.pid = 0
        self.status: int | None = None

    def start(self, control: int, report: int, stop: list, book: "_Book", timeout: float = 30.0) -> bool:
        """Fork the daemon and wait until it listens; False (reported) if it ends, times out or dynsnap says kill."""
        try:
            self.pid = os.fork()
        except OSError as e:
            os.write(report, f"error fork: {e.strerror}\n".encode())
            return False
        if self.pid == 0:
            try:
                os.close(control)
                os.close(report)
                for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                    signal.signal(s, signal.SIG_DFL)
                os.execv(self.argv[0], self.argv)
            except OSError as e:
                os.write(2, f"cannot run {self.argv[0]}: {e.strerror}\n".encode())
            os._exit(127)
        book.update()                              # recorded: a supervisor killed from here on leaves no daemon
        _report(report, f"daemon {self.pid}")
        end = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if stop or self.poll() is not None or time.monotonic() > end:
                _report(report, f"fill-failed {self.status if self.status is not None else -1}")
                return False
            ready, _, _ = select.select([control], [], [], 0.001)
            if ready and os.read(control, 64) in (b"", b"kill\n"):
                return False
        return True

    def poll(self) -> int | None:
        if self.status is None and self.pid:
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, st = self.pid, 255 << 8
            if pid == self.pid:
                self.status = os.waitstatus_to_exitcode(st)
        return self.status

    def until_filled(self, control: int, report: int, stop: list, book: "_Book") -> bool:
        """After ``handover``: dynsnap may exit (its end of the control pipe closing means nothing now); True once
        the daemon exited 0, False (everything killed by the caller) if it failed, was killed or ran too long."""
        try:
            fds = [os.pidfd_open(self.pid)]
        except (AttributeError, OSError):
            fds = []
        watch = [control]
        end = time.monotonic() + self.fill_timeout
        while self.poll() is None:
            if stop or time.monotonic() > end:
                break
            book.update()
            try:
                ready, _, _ = select.select(watch + fds, [], [], 0.05)
            except InterruptedError:
                continue
            if control in ready:
                try:
                    if not os.read(control, 64):
                        watch = []                  # dynsnap has gone, as it may now
                except OSError:
                    watch = []
        for fd in fds:
            os.close(fd)
        ok = self.status == 0
        try:
            _report(report, f"filled {time.monotonic()}" if ok else
                    f"fill-failed {self.status if self.status is not None else -1}")
        except OSError:
            pass                                   # nobody listens any more
        if not ok:
            sys.stderr.write(f"supervise: CRIU's lazy-pages daemon ended with {self.status} before every page was "
                             "in; killing the restored tree\n")
        elif self.cleanup:
            import shutil
            shutil.rmtree(self.cleanup, ignore_errors=True)
        return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

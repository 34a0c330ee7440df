"""pid 1 of a worker's own pid namespace, started by ``dynsnap run`` (see launch.py); part of every such snapshot.

Run as a plain script (``python -I -S nsinit.py --status-fd N -- CMD ...``): it imports only os, signal and sys,
so it adds a few MiB to a snapshot. It makes itself the leader of a new session inside the namespace (CRIU
cannot dump a tree whose session leader lives outside it), starts CMD as its child (pid 2), reports
``ok <host pid>`` or ``error <sentence>`` on the status fd, forwards the usual termination and user signals to
CMD (an init ignores signals it has no handler for, so without this ``kill`` would not reach the worker),
reaps every orphan of the namespace, and exits with CMD's status when CMD ends (the kernel then ends the
rest of the namespace).
"""
import os
import signal
import sys

FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _report(fd: int, line: str) -> None:
    if fd >= 0:
        try:
            os.write(fd, (line + "\n").encode(errors="replace"))
        finally:
            os.close(fd)


def main(argv: list) -> int:
    status_fd, log = -1, None
    while len(argv) >= 2 and argv[0] in ("--status-fd", "--log"):
        if argv[0] == "--status-fd":
            status_fd = int(argv[1])
            os.set_inheritable(status_fd, False)    # the worker must not hold it (launch waits for its EOF)
        else:
            log = argv[1]
        argv = argv[2:]
    if log is not None:
        # the worker's stdout and stderr; opened here so that nothing outside the namespace (unshare's own
        # messages when the tree is killed after a checkpoint) writes to it: CRIU checks that file's size
        try:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            _report(status_fd, f"error cannot open the log {log}: {e.strerror}")
            return 2
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        _report(status_fd, "error no command given")
        return 2
    os.setsid()
    err_r, err_w = os.pipe()                         # close-on-exec: EOF without data means exec succeeded
    child = os.fork()
    if child == 0:
        os.close(err_r)
        for s in (signal.SIGPIPE, signal.SIGXFSZ):   # Python ignores these; the worker gets the defaults
            signal.signal(s, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(err_w, f"cannot execute {argv[0]}: {e.strerror}".encode(errors="replace"))
        os._exit(127)
    os.close(err_w)
    failure = b""
    while True:
        chunk = os.read(err_r, 4096)
        if not chunk:
            break
        failure += chunk
    os.close(err_r)
    if failure:
        os.waitpid(child, 0)
        _report(status_fd, "error " + failure.decode(errors="replace"))
        return 127
    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(child, sig)
        except ProcessLookupError:                   # already gone: its exit status is on the way
            pass

    for s in FORWARD:
        signal.signal(s, forward)
    _report(status_fd, f"ok {os.readlink('/proc/self')}")   # /proc is the host's: its pid seen from outside
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return code
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

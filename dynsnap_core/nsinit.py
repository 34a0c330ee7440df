"""pid 1 of a worker's own pid and mount namespaces, started by ``dynsnap run`` (see launch.py); part of every
such snapshot.

Run as a plain script (``python -I -S nsinit.py --status-fd N -- CMD ...``) by ``unshare --pid --mount --fork``:
it imports only os, signal, sys and ctypes, so it adds a few MiB to a snapshot. It opens the worker's stdio
inside the new mount namespace (CRIU resolves every open file through the namespace's own mounts), puts a
/proc of the new pid namespace in place of the node's (the CUDA driver reads /proc/<getpid()>: with the
node's /proc, cuInit fails with error 304), makes itself the leader of a new session inside the namespace
(CRIU cannot dump a tree whose session leader lives outside it), starts CMD as its child (pid 2), reports
``ok <host pid>`` or ``error <sentence>`` on the status fd, forwards the usual termination and user signals
to CMD (an init ignores signals it has no handler for, so without this ``kill`` would not reach the
worker), reaps every orphan of the namespace, and exits with CMD's status when CMD ends (the kernel then
ends the rest of the namespace).
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


def _own_proc() -> str:
    """Replace the node's /proc (with whatever is mounted below it) by a /proc of this pid namespace.

    Returns an error sentence, or "" on success. Only in a mount namespace of our own (launch.py's
    ``unshare --mount``, private propagation): the node's mount table is never touched.
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MNT_DETACH = 2, 4, 8, 2
    # detached with what is mounted below it, so that the namespace holds one /proc; where that is refused
    # (mounts locked by a container runtime), the new /proc goes on top and hides the node's
    libc.umount2(b"/proc", MNT_DETACH)
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        return f"cannot mount /proc in the worker's mount namespace: {os.strerror(ctypes.get_errno())}"
    return ""


def main(argv: list) -> int:
    status_fd, log, own_proc = -1, None, False
    while argv[:1] == ["--own-proc"] or (len(argv) >= 2 and argv[0] in ("--status-fd", "--log")):
        if argv[0] == "--own-proc":
            own_proc = True
            argv = argv[1:]
            continue
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
    # stdin (and stdout/stderr without a log) were opened outside this mount namespace, on the node's /dev;
    # CRIU finds no such mount in the namespace it dumps, so open /dev/null again from in here
    null = os.open("/dev/null", os.O_RDWR)
    for std in (0,) if log is not None else (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        _report(status_fd, "error no command given")
        return 2
    host_pid = os.readlink("/proc/self")             # the node's /proc, still: our pid seen from outside
    if own_proc:
        failure = _own_proc()
        if failure:
            _report(status_fd, "error " + failure)
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
    _report(status_fd, f"ok {host_pid}")
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

"""CRIU driver: find a CRIU that works on this kernel, run dump/restore, turn its failures into one sentence."""
from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import config
from .errors import CriuError, CriuUnavailable, PermissionDenied

__all__ = ["Criu", "Supervised", "find_criu", "MIN_VERSION", "has_checkpoint_privilege", "require_privilege",
           "PRIVATE_PREFIXES", "run_limits"]

MIN_VERSION = (4, 1)
# Where scripts/setup.sh (through scripts/criu-bundle.sh) installs Debian 13's CRIU when the system's is too old.
PRIVATE_PREFIXES = ("/opt/dynsnap/criu/bin/criu",)
CAP_SYS_ADMIN = 21
CAP_CHECKPOINT_RESTORE = 40

# Lines CRIU logs as "Error" that do not explain a failure (seen with CRIU 4.1.1 on Linux 6.18).
_BENIGN = (re.compile(r"rlimit: Can't setup RLIMIT_NOFILE"),)


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_checkpoint_privilege() -> bool:
    """True when this process may checkpoint others: root, or CAP_CHECKPOINT_RESTORE / CAP_SYS_ADMIN."""
    if os.geteuid() == 0:
        return True
    caps = _effective_caps()
    return bool(caps & (1 << CAP_CHECKPOINT_RESTORE) or caps & (1 << CAP_SYS_ADMIN))


def require_privilege(action: str) -> None:
    if not has_checkpoint_privilege():
        raise PermissionDenied(
            f"{action} needs root or CAP_CHECKPOINT_RESTORE; run dynsnap with sudo", stage="preflight")


def _parse_version(text: str) -> Optional[tuple]:
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def _probe(path: str) -> Optional[tuple]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _parse_version(out.stdout + out.stderr)


@dataclass
class Criu:
    """A CRIU binary (or wrapper) with a known version."""

    path: str
    version: tuple

    @property
    def version_str(self) -> str:
        return ".".join(str(v) for v in self.version)

    def run(self, args: Sequence[str], *, log: Path, stage: str, pid: Optional[int] = None,
            timeout: Optional[float] = None, env: Optional[dict] = None, inherit_stdin: bool = False,
            on_start: Optional[Callable[[int], None]] = None) -> float:
        """Run ``criu ARGS -o LOG -v4``; raise CriuError with one sentence on failure; return seconds.

        CRIU runs in its own process group (unless it needs our terminal): a Ctrl-C meant for dynsnap must
        not kill CRIU while its parasite code runs inside the target, which would leave the target wedged.
        With ``on_start``, CRIU waits behind a gate until ``on_start(pid)`` has returned (dynsnap tells its
        guardian which process to wait for): if dynsnap dies first, CRIU never starts.
        """
        cmd = [self.path, *args, "-o", str(log), "-v4"]
        if on_start is not None:
            cmd = ["/bin/sh", "-c", 'read -r go && exec "$0" "$@" </dev/null', *cmd]
        stdin = subprocess.PIPE if on_start is not None else (None if inherit_stdin else subprocess.DEVNULL)
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **env} if env else None,
                                 **({} if inherit_stdin else {"process_group": 0}))
        except OSError as e:
            raise CriuUnavailable(f"cannot run CRIU at {self.path}: {e.strerror}", stage=stage) from None
        try:
            if on_start is not None:
                gate, p.stdin = p.stdin, None
                try:
                    on_start(p.pid)
                    gate.write("go\n")
                finally:
                    gate.close()        # without "go" the gate reads EOF and CRIU never starts
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise CriuError(f"CRIU {stage} did not finish within {timeout:.0f} s", stage=stage, pid=pid,
                            log=str(log)) from None
        except BaseException:
            # dynsnap is being interrupted: CRIU finishes on its own (killing it mid-dump would wedge the
            # target); wait for it so that the caller's rollback sees the tree as CRIU left it
            p.communicate()
            raise
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise CriuError(explain_failure(stage, pid, log, out), stage=stage, pid=pid, log=str(log))
        return dt

    def start_supervised(self, args: Sequence[str], *, log: Path, stage: str, pid: Optional[int] = None,
                         inherit_stdin: bool = False, journal: Optional[Path] = None) -> "Supervised":
        """Start ``criu ARGS -o LOG -v4`` under the restore supervisor (dynsnap_core/supervise.py): CRIU and every
        process it restores are killed unless ``Supervised.release()`` is called, even if dynsnap is SIGKILLed.
        ``journal``: where the supervisor records those processes (see dynsnap_core.journal)."""
        return Supervised(self, args, log=log, stage=stage, pid=pid, inherit_stdin=inherit_stdin, journal=journal)

    def check(self) -> tuple[bool, str]:
        """Run ``criu check``: (ok, what it said)."""
        try:
            p = subprocess.run([self.path, "check"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        text = (p.stdout + p.stderr).strip()
        lines = [ln for ln in text.splitlines() if "kdat cache" not in ln]
        return p.returncode == 0, "\n".join(lines) or "Looks good."


def run_limits(image_bytes: int) -> tuple[float, int]:
    """How long a CRIU restore of ``image_bytes`` may run and how much log it may write before dynsnap kills it.

    ``$DYNSNAP_CRIU_TIMEOUT`` (seconds) and ``$DYNSNAP_CRIU_LOG_LIMIT_MB`` override the defaults: 120 s plus 30 s
    per GiB of image (a 1 GiB worker restored in 1.4 s on our CPU machine, so this only stops a CRIU that is
    stuck), and 256 MiB of log (healthy restores of a 64 MiB and a 1 GiB worker logged 48 KiB each there; a CRIU
    looping on a damaged pagemap logged 149 MB in 4 s).
    """
    from .errors import InvalidArgument

    def env_number(name: str, default: float) -> float:
        raw = config.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0 or value != value or value == float("inf"):
            raise InvalidArgument(f"{config.SETTINGS[name].env}={raw!r} is not a positive number", stage="preflight")
        return value
    timeout = env_number("criu_timeout", 120.0 + 30.0 * image_bytes / 2**30)
    log_limit = int(env_number("criu_log_limit_mb", 256.0) * 2**20)
    return timeout, log_limit


class Supervised:
    """A CRIU run under the supervisor; see ``Criu.start_supervised``. Use ``wait`` then ``release``/``kill``."""

    _SCRIPT = str(Path(__file__).with_name("supervise.py"))

    def __init__(self, criu: Criu, args: Sequence[str], *, log: Path, stage: str, pid: Optional[int],
                 inherit_stdin: bool, journal: Optional[Path] = None, extra: Sequence[str] = ()):
        self.log, self.stage, self.pid = Path(log), stage, pid
        self.status: Optional[int] = None
        self.criu_pid: Optional[int] = None
        self._out = Path(log).with_suffix(".out")
        control_r, self._control = os.pipe()
        self._report, report_w = os.pipe()
        os.set_blocking(self._report, False)
        cmd = [sys.executable, "-I", "-S", self._SCRIPT, "--control", str(control_r), "--report", str(report_w),
               *(["--journal", str(journal)] if journal is not None else []), *extra,     # extra: lazy_pages.py
               "--", criu.path, *args, "-o", str(log), "-v4"]
        try:
            with open(self._out, "wb") as out:
                self._proc = subprocess.Popen(
                    cmd, stdin=None if inherit_stdin else subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    pass_fds=(control_r, report_w), **({} if inherit_stdin else {"process_group": 0}))
        except OSError as e:
            for fd in (self._control, self._report):
                os.close(fd)
            raise CriuUnavailable(f"cannot run CRIU at {criu.path}: {e.strerror}", stage=stage) from None
        finally:
            os.close(control_r)
            os.close(report_w)
        self._buf = b""
        self._settled = False

    def poll(self) -> Optional[int]:
        """CRIU's exit status once it has ended (the supervisor says so), else None."""
        if self.status is not None:
            return self.status
        eof = False
        try:
            while True:
                data = os.read(self._report, 4096)
                if not data:
                    eof = True
                    break
                self._buf += data
        except BlockingIOError:
            pass
        for line in self._buf.decode(errors="replace").splitlines():
            word, _, rest = line.partition(" ")
            if word == "started" and rest.isdigit():
                self.criu_pid = int(rest)
            elif word == "exit":
                self.status = int(rest) if rest.lstrip("-").isdigit() else 255
            elif word == "error":
                self.status = 255
        if eof and self.status is None:         # the supervisor itself is gone without a word
            self._proc.wait()
            self.status = 255
        return self.status

    def log_size(self) -> int:
        try:
            return os.stat(self.log).st_size
        except OSError:
            return 0

    def output(self) -> str:
        try:
            with open(self._out, "rb") as f:
                return f.read(65536).decode(errors="replace")
        except OSError:
            return ""

    def wait(self, *, timeout: float, log_limit: int, check: Optional[Callable[[], None]] = None,
             interval: float = 0.02) -> float:
        """Wait for CRIU to end, calling ``check()`` (which raises to abort) every ``interval``; kill CRIU and
        all it restored on a time or log-size overrun, a failed check or any exception (KeyboardInterrupt too).
        Raises CriuError when CRIU failed; returns its run time. The restored tree is kept until release/kill."""
        t0 = time.perf_counter()
        end = time.monotonic() + timeout
        overrun = None
        try:
            while self.poll() is None:
                if check is not None:
                    check()
                if self.log_size() > log_limit:
                    overrun = (f"it wrote more than {log_limit >> 20} MiB of log (it loops, most likely on damaged "
                               "images)")
                elif time.monotonic() > end:
                    overrun = f"it did not finish within {timeout:.0f} s"
                if overrun:
                    break
                select.select([self._report], [], [], interval)    # wakes as soon as the supervisor reports
        except BaseException:
            self.kill()
            raise
        if overrun:
            self.kill()
            raise CriuError(f"CRIU {self.stage} was stopped: {overrun}", stage=self.stage, pid=self.pid,
                            log=str(_trim_log(self.log)))
        dt = time.perf_counter() - t0
        if self.status != 0:
            why = explain_failure(self.stage, self.pid, self.log, self.output())
            self.kill()
            raise CriuError(why, stage=self.stage, pid=self.pid, log=str(self.log))
        return dt

    def _settle(self, word: str) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            os.write(self._control, word.encode() + b"\n")
        except OSError:
            pass
        os.close(self._control)
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:       # never seen; do not leave the supervisor behind
            self._proc.kill()
            self._proc.wait()
        os.close(self._report)
        try:
            os.unlink(self._out)
        except OSError:
            pass

    def kill(self) -> None:
        """SIGKILL CRIU and every process it restored; returns once they are all gone."""
        self._settle("kill")

    def release(self) -> None:
        """The restore is complete: leave the restored tree to the system."""
        self._settle("release")


def _trim_log(log: Path, keep: int = 1 << 20) -> Path:
    """Cut a runaway log down to its first and last ``keep`` bytes (the cause is usually near the start)."""
    try:
        size = os.stat(log).st_size
        if size <= 2 * keep:
            return log
        with open(log, "r+b") as f:
            f.seek(size - keep)
            tail = f.read(keep)
            f.seek(keep)
            f.write(b"\n[... dynsnap cut " + str(size - 2 * keep).encode() + b" bytes of a runaway log ...]\n")
            f.write(tail)
            f.truncate()
    except OSError:
        pass
    return log


def find_criu(required: bool = True) -> Optional[Criu]:
    """Find a CRIU >= 4.1: $DYNSNAP_CRIU alone when set, else dynsnap's private prefix, then ``criu`` on PATH.

    The first candidate that answers with a version >= MIN_VERSION wins. When none does and
    ``required`` is set, raise CriuUnavailable saying what was found and how to fix it.
    """
    candidates: list[str] = []
    env = config.get("criu")
    if env:
        candidates.append(env)          # an explicit choice: nothing else is tried
    else:
        candidates += [p for p in PRIVATE_PREFIXES if os.path.exists(p)]
        on_path = shutil.which("criu")
        if on_path:
            candidates.append(on_path)
    too_old = []
    from .probe_cache import cached_version
    for cand in candidates:
        ver = cached_version(cand, _probe)      # `criu --version` once per binary and boot (issue 12)
        if ver is None:
            if cand == env:
                if required:
                    raise CriuUnavailable(f"DYNSNAP_CRIU={env} does not run or does not print a CRIU version",
                                          stage="preflight")
                return None
            continue
        if ver[:2] >= MIN_VERSION:
            return Criu(cand, ver)
        too_old.append(f"{cand} is {'.'.join(map(str, ver))}")
    if not required:
        return None
    if too_old:
        raise CriuUnavailable(
            f"CRIU is too old for this kernel ({'; '.join(too_old)}; need >= 4.1): run scripts/setup.sh "
            "or scripts/criu-bundle.sh to install CRIU 4.1 in /opt/dynsnap/criu", stage="preflight")
    raise CriuUnavailable(
        "CRIU not found: run scripts/setup.sh (or scripts/criu-bundle.sh) or set DYNSNAP_CRIU", stage="preflight")


_PATTERNS = [
    (re.compile(r"Can't fork for (\d+): File exists|pid (\d+) is already in use|Unable to clone"),
     "pid {0} is in use by another process; a snapshot restores with its original pids, so stop "
     "the process holding it first"),
    (re.compile(r"seize.*(Operation not permitted|Permission denied)|ptrace.*Operation not permitted"),
     "CRIU could not attach to the process (permission denied); run as root"),
    (re.compile(r"External socket is used|Can't dump half of stream unix connection"),
     "the process has a Unix socket connected to a process outside the tree; close it first"),
    (re.compile(r"Connected TCP socket|tcp.*established", re.I),
     "the process has established TCP connections; close them before a checkpoint"),
    (re.compile(r"No space left on device"), "no space left on device"),
    (re.compile(r"Don't have tty to inherit session from"),
     "the snapshot is a shell job (its process had the terminal of the shell that started it), so it can only "
     "be restored from a terminal; start workers detached (setsid, stdio redirected) to restore them anywhere"),
    (re.compile(r"Unable to seize.*No such process|No such process"), "the process exited during the checkpoint"),
]


def _error_lines(log: Path) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        if "Error" in line and not any(p.search(line) for p in _BENIGN):
            out.append(line)
    return out


def _clean(line: str) -> str:
    # "(00.012) Error (criu/foo.c:12): message" -> "message"
    m = re.search(r"Error \([^)]*\):\s*(.*)", line)
    return (m.group(1) if m else line).strip().rstrip(".")


def explain_failure(stage: str, pid: Optional[int], log: Path, output: str = "") -> str:
    """One sentence for a failed CRIU run, built from its log's error lines."""
    errors = _error_lines(log)
    what = f"CRIU {stage}" + (f" of pid {pid}" if pid else "")
    joined = "\n".join(errors) + "\n" + output
    for pat, sentence in _PATTERNS:
        m = pat.search(joined)
        if m:
            nums = [g for g in m.groups() if g and g.isdigit()] if m.groups() else []
            return f"{what} failed: " + sentence.format(nums[0] if nums else (pid or "?"))
    if errors:
        # The first error is usually the cause; later ones are the unwinding.
        return f"{what} failed: {_clean(errors[0])}"
    if not errors:
        try:                     # an empty log on a full file system: CRIU could not even write why it failed
            st = os.statvfs(log.parent)
            if st.f_bavail * st.f_frsize < (64 << 10):
                return f"{what} failed: no space left on device for its log in {log.parent}"
        except OSError:
            pass
    tail = [ln for ln in output.strip().splitlines() if ln.strip()]
    if tail:
        return f"{what} failed: {tail[-1].strip()}"
    return f"{what} failed (no error in CRIU's log)"

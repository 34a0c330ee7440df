"""Lazy restore: the restored tree runs before its memory is in place; CRIU's lazy-pages daemon fills it.

``criu restore --lazy-pages`` restores everything but the contents of private anonymous memory, registers that
memory with userfaultfd and hands the descriptor to ``criu lazy-pages`` (CRIU's own daemon, started first, same
image directory and work directory). The daemon copies a page in when the tree touches it (a fault is served
before anything else) and copies the rest in the background until every page is there, then exits 0.

How dynsnap keeps its guarantees on this path (dynsnap_core/snapshot/restore.py):

- Trust: the tree is restored stopped; it is continued only after every checksum matched (as for an eager
  restore). The daemon may already copy pages into the stopped tree while the checksums run; if one fails, the
  tree is killed before it ever ran.
- A page is never served wrong: if the daemon died before every page is in, the kernel would hand the tree zero
  pages for the rest (userfaultfd unregisters when its descriptor closes). So the daemon runs under the same
  restore supervisor as CRIU (dynsnap_core/supervise.py: it starts the daemon, then CRIU once the daemon
  listens). Until the tree runs, that supervisor kills everything when dynsnap fails or dies, as for an eager
  restore. Then dynsnap hands the tree over (``handover``) and may exit: the supervisor keeps the tree until the
  daemon exits 0 (all pages in), then leaves it to the system; a daemon that fails, is killed or outlives the
  restore's time limit gets the tree killed. Left open: the supervisor and the daemon both SIGKILLed during the
  fill (one kill of their process group); the tree then runs with the missing pages zero until the next dynsnap
  command, whose journal recovery kills it (it was recorded with its start time).
- ``dynsnap restore`` returns as soon as the tree runs (``--wait-filled`` waits for the rest); in Python,
  ``RestoredProcess.wait_filled()`` does.

The default (``lazy=None``): lazy where this host supports it (kernel userfaultfd with non-cooperative events,
``criu check --feature uffd-noncoop``, cached per boot, kernel and CRIU), for snapshots without CUDA state
(a GPU worker's driver restore reads the checkpointed device memory out of host memory at once, so the whole
image is faulted in before the first answer either way; measured on the H200 before it becomes the default
there), and for the page-cache prefetch mode. ``$DYNSNAP_RESTORE_LAZY`` = ``on`` / ``off`` overrides.
"""
from __future__ import annotations

import json
import os
import platform
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from . import config
from .criu import Supervised
from .errors import CriuError, InvalidArgument

__all__ = ["choose", "supported", "starter", "LazySupervised", "Fill", "SOCKET"]

SOCKET = "lazy-pages.socket"           # CRIU's name, in the work directory both CRIU processes share


def _cache_file() -> Optional[Path]:
    try:
        from .journal import run_dir
        return run_dir() / "lazy-pages-support"
    except Exception:  # noqa: BLE001 - no run dir: no cache
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


def supported(criu: Any) -> bool:
    """Whether CRIU's lazy restore works here: ``criu check --feature uffd-noncoop`` (about 40 ms), remembered in
    the run directory for this boot, kernel and CRIU binary."""
    key = f"{_boot_id()} {platform.release()} {criu.path} {criu.version_str}"
    cache = _cache_file()
    if cache is not None:
        try:
            k, _, v = cache.read_text().rpartition(" ")
            if k == key:
                return v == "yes"
        except OSError:
            pass
    try:
        p = subprocess.run([criu.path, "check", "--feature", "uffd-noncoop"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        ok = p.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
            tmp.write_text(f"{key} {'yes' if ok else 'no'}")
            os.replace(tmp, cache)
        except OSError:
            pass
    return ok


def choose(lazy: Optional[bool], criu: Any, manifest: dict, prefetch: str, thp: bool = False) -> bool:
    """Resolve ``restore(lazy=...)``: an explicit True/False, else $DYNSNAP_RESTORE_LAZY, else the default above.
    An explicit lazy restore that cannot work here is one sentence, not a silent eager one. THP for the restore
    (``thp``) means eager: the daemon copies pages in 4 KiB at a time, after CRIU (and the THP scope) ended."""
    if lazy is not None and not isinstance(lazy, bool):
        raise InvalidArgument(f"lazy must be True, False or None, not {lazy!r}", stage="preflight")
    if lazy is None:
        env = config.get("restore_lazy") or ""
        if env not in ("", "on", "off"):
            raise InvalidArgument(f"DYNSNAP_RESTORE_LAZY={env!r}: use 'on' or 'off'", stage="preflight")
        if env:
            lazy = env == "on"
        else:
            return prefetch == "pagecache" and not thp and not manifest.get("cuda") and supported(criu)
    if lazy:
        if thp:
            raise InvalidArgument("transparent huge pages for the restore (--thp) need an eager restore: a lazy "
                                  "one fills memory 4 KiB at a time after CRIU is done; use one or the other",
                                  stage="preflight")
        if prefetch != "pagecache":
            raise InvalidArgument(f"a lazy restore reads the snapshot in place; it cannot be combined with prefetch "
                                  f"{prefetch!r} (use prefetch 'pagecache' or an eager restore)", stage="preflight")
        if not supported(criu):
            raise InvalidArgument("a lazy restore needs userfaultfd with non-cooperative events, which this kernel "
                                  "or CRIU lacks (`criu check --feature uffd-noncoop`); restore eagerly "
                                  "(--no-lazy)", stage="preflight")
    return lazy


class LazySupervised(Supervised):
    """``criu restore --lazy-pages`` under the restore supervisor, which first starts ``criu lazy-pages`` and starts
    CRIU once the daemon listens (dynsnap_core/supervise.py, ``_Lazy``). Used like ``Supervised`` up to the end of
    the restore; then ``handover()`` leaves the tree to the supervisor until every page is in."""

    def __init__(self, criu: Any, args: list[str], *, work: Path, fill_timeout: float, **kw: Any) -> None:
        work = Path(work)
        images = args[args.index("-D") + 1]
        daemon = [criu.path, "lazy-pages", "-D", images, "-W", str(work), "-o", str(work / "lazy-pages.log"), "-v4"]
        extra = ["--daemon", json.dumps(daemon), "--daemon-socket", str(work / SOCKET),
                 "--fill-timeout", f"{fill_timeout:.0f}"]
        if config.get("keep_logs") is None:
            extra += ["--cleanup", str(work)]
        super().__init__(criu, [*args, "--lazy-pages"], extra=extra, **kw)
        self.daemon_pid: Optional[int] = None
        self.filled_at: Optional[float] = None          # time.monotonic() of the supervisor's "filled"
        self.fill_status: Optional[int] = None          # None: filling; 0 filled; else the daemon's exit status
        self._lock = threading.Lock()

    def poll(self) -> Optional[int]:
        with self._lock:
            try:                # the base class stops reading once CRIU's exit is known; the fill reports after it
                while self.status is not None and self._report >= 0:
                    data = os.read(self._report, 4096)
                    if not data:
                        break
                    self._buf += data
            except OSError:     # nothing more now (EAGAIN)
                pass
            status = super().poll()
        for line in self._buf.decode(errors="replace").splitlines():
            word, _, rest = line.partition(" ")
            if word == "daemon" and rest.isdigit():
                self.daemon_pid = int(rest)
            elif word == "filled":
                self.fill_status = 0
                try:
                    self.filled_at = float(rest)
                except ValueError:
                    self.filled_at = time.monotonic()
            elif word == "fill-failed":
                self.fill_status = int(rest) if rest.lstrip("-").isdigit() else 255
        return status

    def handover(self) -> None:
        """The tree runs: the supervisor keeps it until the daemon exits 0 (then releases it) and kills it if the
        daemon fails; dynsnap may exit from now on."""
        self._settled = True
        os.write(self._control, b"handover\n")
        os.close(self._control)
        threading.Thread(target=self._reap, name="dynsnap-lazy-reap", daemon=True).start()

    def _reap(self) -> None:
        """Once the supervisor has ended: keep what it said last, close our end (no fd stays behind in a
        long-running caller such as the agent that never asks)."""
        self._proc.wait()
        self.poll()
        self.close()

    def wait_filled(self, timeout: Optional[float] = None) -> float:
        """Block until the supervisor says the fill ended; the monotonic time it ended. CriuError if it failed."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.fill_status is not None:
                break
            if self._proc.poll() is not None:        # the supervisor ended: read what it said last
                self.poll()
                if self.fill_status is None:
                    self.fill_status = 255               # gone without a word
                break
            if end is not None and time.monotonic() > end:
                raise TimeoutError("the lazy restore is still filling memory")
            try:
                select.select([self._report], [], [], 0.05)
            except (OSError, ValueError):            # closed by the reaper meanwhile: its last words are read
                time.sleep(0.01)
        if self.fill_status != 0:
            why = "killed" if self.fill_status < 0 else f"exit status {self.fill_status}"
            raise CriuError(f"CRIU's lazy-pages daemon ended ({why}) before every page was in; the restored tree "
                            "was killed (its memory was incomplete)", stage="lazy restore",
                            log=str(self.log.with_name("lazy-pages.log")))
        return self.filled_at or time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._report >= 0:
                os.close(self._report)
                self._report = -1


def starter(criu: Any, lazy: bool, work: Path, fill_timeout: float) -> Callable[..., Supervised]:
    """How restore starts CRIU: ``criu.start_supervised``, or for a lazy restore the daemon first, then CRIU."""
    if not lazy:
        return criu.start_supervised
    return lambda args, **kw: LazySupervised(criu, list(args), work=work, fill_timeout=fill_timeout, **kw)


class Fill:
    """What ``RestoredProcess.fill`` holds for a lazy restore: hands the tree over, then reports on the fill."""

    def __init__(self, run: LazySupervised, t_start: float, timings: dict) -> None:
        self.run, self.timings = run, timings
        self._t0 = time.monotonic() - (time.perf_counter() - t_start)      # the restore's start, monotonic
        run.handover()

    @property
    def daemon_pid(self) -> Optional[int]:
        self.run.poll()
        return self.run.daemon_pid

    def done(self) -> bool:
        self.run.poll()
        return self.run.fill_status is not None

    def wait(self, timeout: Optional[float] = None) -> float:
        """Seconds from the restore's start until every page was in; CriuError if the fill failed (tree killed)."""
        try:
            at = self.run.wait_filled(timeout)
        except TimeoutError:
            raise
        except BaseException:
            self.run.close()
            raise
        self.run.close()
        self.timings["memory_filled"] = at - self._t0
        return self.timings["memory_filled"]

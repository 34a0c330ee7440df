"""Lazy restore: the restored tree runs before its memory is in place; CRIU's lazy-pages daemon fills it.

``criu restore --lazy-pages`` restores everything but the contents of private anonymous memory, registers that
memory with userfaultfd and hands the descriptor to ``criu lazy-pages`` (CRIU's own daemon, started first, same
image directory and work directory). The daemon copies a page in when the tree touches it (a fault is served
before anything else) and copies the rest in the background until every page is there, then exits 0.

How dynsnap keeps its guarantees on this path (dynsnap_core/snapshot.py ``restore``):

- Trust: the tree is restored stopped; it is continued only after every checksum matched (as for an eager
  restore). The daemon may already copy pages into the stopped tree while the checksums run; if one fails, the
  tree is killed before it ever ran.
- A page is never served wrong: if the daemon dies before every page is in, the kernel would hand the tree zero
  pages for the rest (userfaultfd unregisters when its descriptor closes). So the daemon runs under the restore
  supervisor (dynsnap_core/supervise.py) and the restore's own supervisor keeps the restored tree until the
  daemon has exited 0: a daemon that fails, is killed or outlives its time limit gets the tree killed, and so
  does dynsnap dying before the fill is complete (both supervisors see their control pipe close). Only then is
  the tree left to the system.
- ``dynsnap restore`` returns when the memory is complete; the worker answers from the moment it is continued.
  In Python, ``restore()`` returns at that moment and ``RestoredProcess.wait_filled()`` waits for the rest (an
  interpreter that exits first waits for it too: the fill thread is not a daemon thread).

The default (``lazy=None``): lazy where this host supports it (kernel userfaultfd with non-cooperative events,
``criu check --feature uffd-noncoop``, cached per boot, kernel and CRIU), for snapshots without CUDA state
(a GPU worker's driver restore reads the checkpointed device memory out of host memory at once, so the whole
image is faulted in before the first answer either way; measured on the H200 before it becomes the default
there), and for the page-cache prefetch mode. ``$DYNSNAP_RESTORE_LAZY`` = ``on`` / ``off`` overrides.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import CriuError, InvalidArgument

__all__ = ["choose", "supported", "Daemon", "Filler", "SOCKET"]

SOCKET = "lazy-pages.socket"           # CRIU's name, in the work directory both CRIU processes share
START_TIMEOUT = 30.0


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
        env = os.environ.get("DYNSNAP_RESTORE_LAZY", "")
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


class Daemon:
    """``criu lazy-pages`` for one restore, under the restore supervisor; started before ``criu restore``."""

    def __init__(self, criu: Any, restore_args: list[str], work: Path, journal: Optional[Path]) -> None:
        images = restore_args[restore_args.index("-D") + 1]
        self.work = Path(work)
        self.sup = criu.start_supervised(["lazy-pages", "-D", images, "-W", str(self.work)],
                                         log=self.work / "lazy-pages.log", stage="lazy restore", journal=journal)

    def ready(self) -> None:
        """Wait until the daemon listens (CRIU's restore connects early and fails if nobody does)."""
        end = time.monotonic() + START_TIMEOUT
        try:
            while not (self.work / SOCKET).exists():      # the daemon listens before CRIU may connect
                if self.sup.poll() is not None or time.monotonic() > end:
                    self.sup.wait(timeout=1, log_limit=1 << 30)     # raises CRIU's one sentence
                    raise CriuError("CRIU's lazy-pages daemon ended before it listened", stage="lazy restore",
                                    log=str(self.sup.log))
                time.sleep(0.001)
        except BaseException:
            self.sup.kill()
            raise

    @staticmethod
    def restore_args() -> list[str]:
        return ["--lazy-pages"]

    def kill(self) -> None:
        self.sup.kill()


class Filler:
    """Waits, in a thread, for the daemon to have copied every page, then leaves the tree to the system; kills the
    tree if the daemon fails. ``wait()`` joins it: seconds from the restore's start to complete memory, or the
    error that got the tree killed."""

    def __init__(self, daemon: Daemon, run: Any, *, timeout: float, log_limit: int, t_start: float,
                 timings: dict, cleanup: Callable[[], None]) -> None:
        self.daemon, self.run, self.error = daemon, run, None
        self._timeout, self._log_limit, self._t_start, self._timings = timeout, log_limit, t_start, timings
        self._cleanup = cleanup
        self._thread = threading.Thread(target=self._fill, name="dynsnap-lazy-fill", daemon=False)
        self._thread.start()

    @property
    def daemon_pid(self) -> Optional[int]:
        return self.daemon.sup.criu_pid

    def _fill(self) -> None:
        try:
            self.daemon.sup.wait(timeout=self._timeout, log_limit=self._log_limit)
        except BaseException as e:  # noqa: BLE001 - any end but a clean exit: the tree must not run on
            self.error = e
            self.run.kill()       # the restored tree: its missing pages would read as zeros
            self.daemon.kill()
            return
        self._timings["memory_filled"] = time.perf_counter() - self._t_start
        self.run.release()
        self.daemon.sup.release()
        self._cleanup()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> float:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the lazy restore is still filling memory")
        if self.error is not None:
            e = self.error
            if isinstance(e, CriuError):
                raise CriuError(f"{e.message}; the restored tree was killed (its memory was incomplete)",
                                stage="lazy restore", log=getattr(e, "log", None)) from None
            raise e
        return self._timings["memory_filled"]


def remove_workdir(work: Path) -> Callable[[], None]:
    def go() -> None:
        if os.environ.get("DYNSNAP_KEEP_LOGS") is None:
            shutil.rmtree(work, ignore_errors=True)
    return go

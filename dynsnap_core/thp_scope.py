"""Transparent huge pages set to `always` for the length of a CRIU restore, and put back on every exit path.

CRIU's restore of a large worker is bound by 4 KiB page faults in one thread; with THP `always` the kernel backs
the restored anonymous memory with 2 MiB pages (measured: a warm restore of a 555 MiB image 0.41 s -> 0.21-0.24
s once free huge pages exist; benches/RESULTS.md). The switch is host-wide, so it is opt-in
(``restore(thp=True)``, ``dynsnap restore --thp``, ``DYNSNAP_RESTORE_THP=always``) and scoped with care:

- the value found before the first scope is saved in ``$DYNSNAP_RUN_DIR/thp/saved``; each scope holds a file
  named for its process (pid and start time); the last scope to leave writes the saved value back;
- a scope whose process died (dynsnap SIGKILLed mid-restore) is pruned by :func:`recover`, which every dynsnap
  command runs, and the saved value comes back once no live scope remains;
- concurrent restores share one switch (a lock file serialises the bookkeeping).

The restored worker keeps the huge pages it was given; nothing else changes for it.
"""
from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import Optional

from . import config, proc

__all__ = ["ThpScope", "recover", "current", "ENABLED"]

ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def current(path: Path = ENABLED) -> Optional[str]:
    """The selected THP mode ("always", "madvise", "never"), or None without THP."""
    from .hugepages import sysfs_selected
    return sysfs_selected(str(path))


def _dir() -> Path:
    return config.run_dir() / "thp"


def _me() -> str:
    return f"{os.getpid()}-{proc.start_time(os.getpid())}-{secrets.token_hex(4)}"


def _alive(name: str) -> bool:
    """Whether the holder named ``pid-start-tag`` is a live process (the very one, not a reused pid)."""
    return proc.same_process(name.split("-")[:2])


class _Locked:
    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> "_Locked":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _settle(d: Path, enabled: Path) -> Optional[str]:
    """With the lock held: drop holders of dead processes; with none left, put the saved mode back. Returns the
    mode written back, if any."""
    holders = []
    for p in d.glob("holder-*"):
        if _alive(p.name[len("holder-"):]):
            holders.append(p)
        else:
            p.unlink(missing_ok=True)
    saved = d / "saved"
    if holders or not saved.exists():
        return None
    mode = saved.read_text().strip()
    try:
        enabled.write_text(mode)
    except OSError:
        return None                      # cannot write it back now: the next command tries again
    saved.unlink(missing_ok=True)
    return mode


def recover(enabled: Path = ENABLED) -> Optional[str]:
    """Put the saved THP mode back when no live restore holds the switch (a dynsnap killed mid-restore)."""
    d = _dir()
    if not (d / "saved").exists():
        return None
    with _Locked(d):
        return _settle(d, enabled)


class ThpScope:
    """``with ThpScope():`` THP is `always` inside (when the kernel has it and we may write it); never raises
    for a host without THP: ``active`` says whether the switch is held."""

    def __init__(self, enabled: Path = ENABLED) -> None:
        self.enabled, self.active, self._holder = enabled, False, None

    def __enter__(self) -> "ThpScope":
        if current(self.enabled) is None or not os.access(self.enabled, os.W_OK):
            return self
        d = _dir()
        with _Locked(d):
            _settle(d, self.enabled)
            saved = d / "saved"
            if not saved.exists():
                tmp = d / f"saved.tmp.{os.getpid()}"
                tmp.write_text(current(self.enabled) or "madvise")
                os.replace(tmp, saved)
            self._holder = d / f"holder-{_me()}"
            self._holder.touch()
            try:
                self.enabled.write_text("always")
                self.active = True
            except OSError:
                self._holder.unlink(missing_ok=True)
                self._holder = None
                _settle(d, self.enabled)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._holder is None:
            return
        d = _dir()
        with _Locked(d):
            self._holder.unlink(missing_ok=True)
            self._holder = None
            _settle(d, self.enabled)
        self.active = False

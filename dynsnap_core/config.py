"""Every setting dynsnap reads from the environment, in one place, overridable in-process like kvikio's defaults.

    from dynsnap_core.config import defaults
    defaults.get("staging")                     # $DYNSNAP_STAGING, else "auto"
    with defaults.set("restore_prefetch", "off"):   # or defaults.set({"home": "/srv/dynsnap", ...})
        dynsnap_core.restore(...)

A value comes from, first to last: ``defaults.set`` (process-wide; undone when its ``with`` block ends), the
environment variable, the default. The environment is read when a value is asked for (not cached at import), so
a process that changes its own environment sees the change. Nothing else in dynsnap_core reads ``DYNSNAP_*``.

Test hooks (fault injection) are not settings: ``test_hook(name)`` answers only when the environment also holds
``DYNSNAP_TEST_HOOKS=1``, which the test suite sets and no deployment does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = ["SETTINGS", "Setting", "Defaults", "defaults", "get", "home", "run_dir", "snapshots_root", "weights_store",
           "test_hook"]


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Optional[str]
    what: str


SETTINGS = {s.name: s for s in (
    Setting("home", "DYNSNAP_HOME", None,
            "where snapshots, weights and run state live (default: /var/lib/dynsnap for root, else "
            "$XDG_DATA_HOME/dynsnap)"),
    Setting("run_dir", "DYNSNAP_RUN_DIR", None,
            "journal and locks (default: /run/dynsnap for root, else $XDG_RUNTIME_DIR/dynsnap, else HOME/run)"),
    Setting("weights", "DYNSNAP_WEIGHTS", None, "the weight store (default: HOME/weights)"),
    Setting("staging", "DYNSNAP_STAGING", "auto", "where CRIU dumps before persisting: auto, tmpfs or target"),
    Setting("tmpfs", "DYNSNAP_TMPFS", None, "a tmpfs to stage dumps in before /dev/shm"),
    Setting("restore_prefetch", "DYNSNAP_RESTORE_PREFETCH", "pagecache", "how restore reads the images first"),
    Setting("restore_thp", "DYNSNAP_RESTORE_THP", "", "'always' restores with THP at always, 'off' (or empty) not"),
    Setting("restore_lazy", "DYNSNAP_RESTORE_LAZY", "", "'on' or 'off' forces lazy restore either way (empty: "
            "lazy where userfaultfd works, for snapshots without CUDA state)"),
    Setting("keep_logs", "DYNSNAP_KEEP_LOGS", None, "set (to anything) to keep restore's CRIU work directory"),
    Setting("criu", "DYNSNAP_CRIU", None, "the CRIU binary (then nothing else is tried)"),
    Setting("criu_timeout", "DYNSNAP_CRIU_TIMEOUT", None, "seconds a CRIU restore may run"),
    Setting("criu_log_limit_mb", "DYNSNAP_CRIU_LOG_LIMIT_MB", None, "MiB of log a CRIU restore may write"),
    Setting("storage", "DYNSNAP_STORAGE", None, "the agent's remote store (s3://bucket/prefix)"),
    Setting("s3_endpoint", "DYNSNAP_S3_ENDPOINT", None, "an S3-compatible endpoint URL"),
    Setting("agent_workers", "DYNSNAP_AGENT_WORKERS", "4", "the agent's worker threads"),
    Setting("agent_log_level", "DYNSNAP_AGENT_LOG_LEVEL", "warning", "the agent's log level"),
    Setting("gms_socket", "DYNSNAP_GMS_SOCKET", None,
            "the GPU memory service's socket (default: RUN_DIR/gms.sock)"),
    Setting("fio", "DYNSNAP_FIO", None, "fio for bench io's device-limit rows"),
    Setting("io_sweep", "DYNSNAP_IO_SWEEP", "", "1: bench io adds a block size x queue depth table"),
    Setting("io_sweep_mb", "DYNSNAP_IO_SWEEP_MB", None, "MiB per cell of that table"),
)}

_MISSING = object()


class Defaults:
    """The settings: ``get(name)``, ``set(name, value)`` / ``set({name: value})`` (also a context manager)."""

    def __init__(self) -> None:
        self._over: dict[str, Optional[str]] = {}

    def _setting(self, name: str) -> Setting:
        try:
            return SETTINGS[name]
        except KeyError:
            raise KeyError(f"no dynsnap setting {name!r}: one of {', '.join(SETTINGS)}") from None

    def get(self, name: str) -> Optional[str]:
        """The value as text: the override, else the environment (an empty variable counts as unset), else the
        default (None where there is none)."""
        s = self._setting(name)
        if name in self._over:
            return self._over[name]
        return os.environ.get(s.env) or s.default

    def set(self, name: Any, value: Any = _MISSING) -> "_Restore":
        """Override settings for this process; ``None`` sets a setting back to its environment/default. Used as
        a context manager the previous overrides come back at the end of the block."""
        pairs = dict(name) if isinstance(name, dict) else {name: value}
        if any(v is _MISSING for v in pairs.values()):
            raise TypeError("defaults.set(name, value) or defaults.set({name: value, ...})")
        before = dict(self._over)
        for k, v in pairs.items():
            self._setting(k)
            if v is None:
                self._over.pop(k, None)
            else:
                self._over[k] = os.fspath(v) if isinstance(v, os.PathLike) else str(v)
        return _Restore(self, before)

    def items(self) -> Iterator[tuple[str, Optional[str]]]:
        for name in SETTINGS:
            yield name, self.get(name)


class _Restore:
    def __init__(self, d: Defaults, before: dict):
        self._d, self._before = d, before

    def __enter__(self) -> Defaults:
        return self._d

    def __exit__(self, *exc: Any) -> None:
        self._d._over = self._before


defaults = Defaults()
get = defaults.get


def _place(name: str, as_root: str, xdg: str, xdg_default: Optional[str], last: Any) -> Path:
    """The setting ``name`` when set, else ``as_root`` for root, else $``xdg``/dynsnap, else ``last()``."""
    v = get(name)
    if v:
        return Path(v)
    if os.geteuid() == 0:
        return Path(as_root)
    base = os.environ.get(xdg) or (os.path.expanduser(xdg_default) if xdg_default else None)
    return Path(base) / "dynsnap" if base else last()


def home() -> Path:
    """$DYNSNAP_HOME, else /var/lib/dynsnap for root, else $XDG_DATA_HOME/dynsnap (~/.local/share/dynsnap)."""
    return _place("home", "/var/lib/dynsnap", "XDG_DATA_HOME", "~/.local/share", None)


def run_dir() -> Path:
    """$DYNSNAP_RUN_DIR, else /run/dynsnap for root, else $XDG_RUNTIME_DIR/dynsnap, else the home's run/."""
    return _place("run_dir", "/run/dynsnap", "XDG_RUNTIME_DIR", None, lambda: home() / "run")


def snapshots_root() -> Path:
    """Where named snapshots live: ``<dynsnap home>/snapshots``."""
    return home() / "snapshots"


def weights_store() -> Path:
    """``$DYNSNAP_WEIGHTS`` else ``<dynsnap home>/weights``."""
    v = get("weights")
    return Path(v) if v else home() / "weights"


TEST_HOOKS = ("FAULT", "MEMSVC_LOAD_DELAY")


def test_hook(name: str) -> Optional[str]:
    """The value of test hook ``DYNSNAP_<name>`` (``FAULT``, ``MEMSVC_LOAD_DELAY``), or None. Hooks answer only
    while ``DYNSNAP_TEST_HOOKS=1`` is in the environment too, so an ordinary environment cannot switch one on."""
    if name not in TEST_HOOKS:
        raise KeyError(f"no test hook {name!r}: one of {', '.join(TEST_HOOKS)}")
    if os.environ.get("DYNSNAP_TEST_HOOKS") != "1":
        return None
    return os.environ.get("DYNSNAP_" + name) or None



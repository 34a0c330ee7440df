"""The snapshots on this node: where they live (home, names), listing, removal, stale staging; and the little
that checkpoint and restore share (argument checks, deferred signals, CRIU's mount namespace arguments)."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import manifest as mf
from .. import config, proc
from ..durable import fsync_path, tree_bytes
from ..errors import DynsnapError, InvalidArgument, SnapshotCorrupt, SnapshotNotFound, StorageError

__all__ = ["default_home", "snapshots_root", "resolve", "list_snapshots", "remove", "clean_stale_staging",
           "STAGING_TAG"]

STAGING_TAG = ".dynsnap-staging."


Progress = Optional[Callable[[str, int, int], Any]]   # (phase, done, total)


def default_home() -> Path:
    """$DYNSNAP_HOME, else /var/lib/dynsnap for root, else $XDG_DATA_HOME/dynsnap (~/.local/share/dynsnap)."""
    return config.home()


def snapshots_root() -> Path:
    return config.snapshots_root()


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A path (it holds a ``/`` or starts with ``.``) as given, or a bare name: the snapshot root's NAME or
    ``./NAME``, whichever exists; a bare name that names both is refused (say ``./NAME`` or the full path)."""
    _check_path_arg(path_or_name, "snapshot")
    text = os.fspath(path_or_name)
    p = Path(text)
    if os.sep in text or text.startswith("."):
        return p
    cand = snapshots_root() / p
    here, there = os.path.lexists(p), os.path.lexists(cand)
    if here and there:
        try:
            same = os.path.samefile(p, cand)
        except OSError:
            same = False
        if not same:
            raise InvalidArgument(f"{text!r} names both {p.absolute()} and {cand}; write ./{text} or the full path",
                                  stage="preflight", path=text)
    return cand if there else p


def _staging_owner_alive(token: str) -> bool:
    """Whether the dynsnap named in a staging name still runs: ``PID`` (older names) or ``PID.START``."""
    pid_s, _, start_s = token.partition(".")
    if not pid_s.isdigit():
        return True                      # not ours to judge: keep it
    pid = int(pid_s)
    if not proc.exists(pid):
        return False
    return not start_s.isdigit() or proc.start_time(pid) == int(start_s)


def clean_stale_staging(parent: Optional[Path] = None) -> list[tuple[Path, int]]:
    """Remove staging left by a dynsnap that was killed (its pid no longer alive, or reused): hidden staging
    directories next to snapshots in ``parent``, and CRIU dump / restore prefetch directories in tmpfs (swept by
    every command: a killed checkpoint of a large worker leaves its whole image there). Returns (path, bytes)."""
    removed = []
    places: list[tuple[Path, Callable[[str], Optional[str]]]] = []
    if parent is not None:
        places.append((Path(parent), lambda n: n.rsplit(".", 1)[1] if STAGING_TAG in n else None))
    tmpfs = _tmpfs_dir()
    if tmpfs is not None:
        places.append((tmpfs, lambda n: n.split("-")[2] if n.startswith(("dynsnap-dump-", "dynsnap-restore-"))
                       and n.count("-") >= 3 else None))
    for where, owner in places:
        try:
            entries = list(where.iterdir())
        except OSError:
            continue
        for e in entries:
            token = owner(e.name)
            if token is None or _staging_owner_alive(token):
                continue
            try:
                if e.is_symlink() or not e.is_dir():
                    continue             # staging is always a real directory; leave anything else alone
            except OSError:
                continue
            size = tree_bytes(e)
            shutil.rmtree(e, ignore_errors=True)
            removed.append((e, size))
    return removed


def _staging_token() -> str:
    """``PID.START`` of this dynsnap, put in staging names so that a reused pid is not mistaken for the owner."""
    return f"{os.getpid()}.{proc.start_time(os.getpid()) or 0}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_path_arg(v: Any, name: str) -> None:
    if not isinstance(v, (str, os.PathLike)) or isinstance(v, bytes):
        raise InvalidArgument(f"{name} must be a path (str or os.PathLike), not {type(v).__name__}",
                              stage="preflight")
    text = os.fspath(v)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidArgument(f"{name} must be a non-empty path without NUL bytes, not {text!r}", stage="preflight")


def _check_engine_arg(engine: Any) -> None:
    from ..io import ENGINES
    if not isinstance(engine, str) or (engine != "auto" and engine not in ENGINES):
        raise InvalidArgument(f"unknown I/O engine {engine!r}: use auto or one of {', '.join(ENGINES)}",
                              stage="preflight")


def _tmpfs_dir() -> Optional[Path]:
    for cand in (config.get("tmpfs"), "/dev/shm"):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK):
            return Path(cand)
    return None


_SNAPSHOT_TOP = {mf.MANIFEST_NAME, "criu", mf.MANIFEST_NAME + ".tmp"}


def _foreign_entry(p: Path) -> Optional[str]:
    """The first entry of directory ``p`` that a dynsnap snapshot never holds, or None."""
    try:
        top = sorted(os.listdir(p))
    except OSError as e:
        return f"(cannot be listed: {e.strerror})"
    for name in top:
        if name not in _SNAPSHOT_TOP:
            return name
    criu = p / "criu"
    if os.path.lexists(criu):
        if criu.is_symlink() or not criu.is_dir():
            return "criu (not a directory)"
        for name in sorted(os.listdir(criu)):
            if not stat.S_ISREG(os.lstat(criu / name).st_mode):
                return f"criu/{name} (not a regular file)"
    return None


def remove(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Delete a snapshot: it disappears at once (renamed to hidden staging), then its files are removed.

    Refuses a directory that is not a dynsnap snapshot unless ``force`` is set and it holds a manifest.json
    and nothing a snapshot never holds (a damaged snapshot); refuses a symbolic link (names its target); never
    deletes anything else.
    """
    given = resolve(path)
    p = given.absolute()
    if p.is_symlink():
        raise InvalidArgument(f"{p} is a symbolic link to {os.readlink(p)}: dynsnap rm removes snapshot directories, "
                              "not links; name the snapshot itself, or remove the link with rm(1)", stage="remove",
                              path=str(p))
    if not p.is_dir():
        raise SnapshotNotFound(f"no snapshot at {p}", stage="remove", path=str(p))
    try:
        mf.read(p)
    except SnapshotCorrupt as e:
        if not force:
            raise SnapshotCorrupt(f"refusing to remove {p}: {e.message} (use --force for a damaged snapshot)",
                                  stage="remove", path=str(p)) from None
        if not (p / mf.MANIFEST_NAME).is_file():
            raise SnapshotCorrupt(f"refusing to remove {p}: it holds no manifest.json, so it is not a dynsnap "
                                  "snapshot", stage="remove", path=str(p)) from None
    foreign = _foreign_entry(p)
    if foreign is not None:
        raise SnapshotCorrupt(f"refusing to remove {p}: it holds {foreign}, which a dynsnap snapshot never does; "
                              "remove it yourself if you are sure", stage="remove", path=str(p))
    doomed = p.parent / f".{p.name}{STAGING_TAG}{os.getpid()}"
    try:
        os.rename(p, doomed)
    except OSError as e:
        raise StorageError(f"cannot remove {p}: {e.strerror}", stage="remove", path=str(p), errno=e.errno) from None
    fsync_path(p.parent)
    shutil.rmtree(doomed, ignore_errors=True)
    return p


def list_snapshots(root: Optional[Path] = None) -> list[dict]:
    """Snapshots under ``root`` (default: the home's snapshots/): name, path, size, age, command, status."""
    root = Path(root) if root else snapshots_root()
    rows = []
    if not root.is_dir():
        return rows
    clean_stale_staging(root)
    for d in sorted(root.iterdir()):
        if not d.is_dir() or STAGING_TAG in d.name:
            continue
        row: dict[str, Any] = {"name": d.name, "path": str(d)}
        try:
            m = mf.read(d)
        except (DynsnapError, OSError) as e:       # one bad snapshot must not hide the others
            row.update(status="damaged", error=str(e))
        else:
            row.update(status="ok", bytes=m["total_bytes"], created=m["created"],
                       age_s=max(0.0, time.time() - m.get("created_unix", time.time())),
                       command=" ".join(m.get("cmdline") or [m.get("comm", "?")]), pid=m["root_pid"],
                       gpu=bool(m.get("cuda")))
        rows.append(row)
    return rows


# A worker's own mount namespace (`dynsnap run`): every mount in it but its /proc is one of the node's, which CRIU
# records as external (by mount point, not by content: /dev/shm or /tmp never enter the image) and binds again
# from the node at restore.
CRIU_MNTNS_ARGS = ("--external", "mnt[]")


@contextmanager
def _deferred_signals(state: dict) -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into a flag checked at safe points, so a kill rolls back cleanly."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        old = {s: signal.getsignal(s) for s in sigs}

        def handler(signum, frame):
            state["signal"] = signum
        for s in sigs:
            signal.signal(s, handler)
    except ValueError:          # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

"""Snapshot orchestration: checkpoint (freeze, CRIU dump, persist, atomic commit), restore, verify, list."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import shutil
import signal
import stat
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import criu_images, lazy_pages, thp_scope
from . import manifest as mf
from . import proc
from .criu import find_criu, require_privilege, run_limits
from .durable import fsync_path, tree_bytes
from .guardian import Guardian
from .journal import Entry, TreeLock, recover, restore_entry, traced_by
from .errors import (CriuError, CudaDeviceMismatch, CudaUnavailable, DynsnapError, InvalidArgument, InvalidTarget,
                     SnapshotCorrupt,
                     SnapshotExists,
                     SnapshotNotFound, StorageError)

__all__ = ["Snapshot", "RestoredProcess", "checkpoint", "restore", "open_snapshot", "list_snapshots", "remove",
           "default_home", "Interrupted"]

STAGING_TAG = ".dynsnap-staging."
# A worker's own mount namespace (`dynsnap run`): every mount in it but its /proc is one of the node's, which CRIU
# records as external (by mount point, not by content: /dev/shm or /tmp never enter the image) and binds again
# from the node at restore.
CRIU_MNTNS_ARGS = ("--external", "mnt[]")
MIN_LOG_SPACE = 4 << 20          # free space a restore needs in the home's logs/ (CRIU's log and pidfile)
Progress = Optional[Callable[[str, int, int], Any]]   # (phase, done, total)


def _version() -> str:
    from . import __version__
    return __version__


def default_home() -> Path:
    """$DYNSNAP_HOME, else /var/lib/dynsnap for root, else $XDG_DATA_HOME/dynsnap (~/.local/share/dynsnap)."""
    env = os.environ.get("DYNSNAP_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/dynsnap")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(xdg) / "dynsnap"


def snapshots_root() -> Path:
    return default_home() / "snapshots"


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


class Interrupted(DynsnapError):
    """dynsnap was asked to stop (SIGINT/SIGTERM/SIGHUP) and rolled back."""


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


def _check_interrupt(state: dict, stage: str) -> None:  # checkpoint's safe points
    if state.get("signal"):
        name = signal.Signals(state["signal"]).name
        raise Interrupted(f"checkpoint interrupted by {name} during {stage}; nothing was kept", stage=stage)


@dataclass
class Snapshot:
    """A committed snapshot directory and its manifest."""

    path: Path
    manifest: dict

    @property
    def root_pid(self) -> int:
        return self.manifest["root_pid"]

    @property
    def total_bytes(self) -> int:
        return self.manifest["total_bytes"]

    @property
    def timings(self) -> dict:
        return self.manifest.get("timings", {})

    def verify(self, progress: Progress = None, *, prefetch: bool = False) -> int:
        """Check every file's size and checksum; raise SnapshotCorrupt naming the first bad file.

        With ``prefetch`` the reads go through the page cache, leaving the images there for a restore.
        """
        cb = (lambda d, t: progress("verify", d, t)) if progress else None
        return mf.verify_files(self.path, self.manifest, direct=not prefetch, progress=cb)

    def restore(self, **kw) -> "RestoredProcess":
        return restore(self.path, **kw)

    def remove(self) -> None:
        """Delete this snapshot (it disappears atomically, then its files are removed)."""
        remove(self.path)

    def to_dict(self) -> dict:
        return {"path": str(self.path), **self.manifest}


@dataclass
class RestoredProcess:
    """The root of a restored process tree. It is not our child (CRIU re-parents it)."""

    pid: int
    snapshot: Snapshot
    timings: dict = field(default_factory=dict)
    fill: Optional[Any] = field(default=None, repr=False)     # lazy restore: lazy_pages.Fill

    def wait_filled(self, timeout: Optional[float] = None) -> float:
        """Lazy restore: wait until every page is in (seconds from the restore's start); 0.0 for an eager one."""
        return self.fill.wait(timeout) if self.fill is not None else 0.0

    def alive(self) -> bool:
        return proc.exists(self.pid)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        proc.kill_tree(list(reversed(proc.tree(self.pid))), sig)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "snapshot": str(self.snapshot.path), "timings": self.timings}


def open_snapshot(path: str | os.PathLike) -> Snapshot:
    p = resolve(path)
    return Snapshot(p, mf.read(p))


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


STAGING_MODES = ("auto", "tmpfs", "target")


def staging_setting() -> str:
    """$DYNSNAP_STAGING checked: auto (default), tmpfs or target; anything else is one sentence."""
    mode = os.environ.get("DYNSNAP_STAGING") or "auto"
    if mode not in STAGING_MODES:
        raise InvalidArgument(f"DYNSNAP_STAGING={mode!r} is not one of {', '.join(STAGING_MODES)}", stage="preflight")
    if mode == "tmpfs" and _tmpfs_dir() is None:
        raise InvalidArgument("DYNSNAP_STAGING=tmpfs but there is no writable tmpfs (/dev/shm or $DYNSNAP_TMPFS)",
                              stage="preflight")
    return mode


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
    from .io import ENGINES
    if not isinstance(engine, str) or (engine != "auto" and engine not in ENGINES):
        raise InvalidArgument(f"unknown I/O engine {engine!r}: use auto or one of {', '.join(ENGINES)}",
                              stage="preflight")


def _check_extra_manifest(extra: Any) -> None:
    if extra is None:
        return
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise InvalidArgument("extra_manifest must be a dict with string keys", stage="preflight")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"extra_manifest must hold JSON values only: {e}", stage="preflight") from None


def _tmpfs_dir() -> Optional[Path]:
    for cand in (os.environ.get("DYNSNAP_TMPFS"), "/dev/shm"):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK):
            return Path(cand)
    return None


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def choose_dump_dir(target_parent: Path, estimate: int, mode: Optional[str] = None) -> tuple[Path, str]:
    """Where CRIU dumps: tmpfs when the image fits comfortably in free memory, else the target file system.

    Override with DYNSNAP_STAGING=tmpfs|target (``mode``; read from the environment when None).
    """
    mode = mode or staging_setting()
    tmpfs = _tmpfs_dir()
    if mode != "target" and tmpfs is not None:
        st = os.statvfs(tmpfs)
        free = st.f_bavail * st.f_frsize
        fits = free > estimate * 1.2 + (256 << 20) and _mem_available() > estimate * 2 + (512 << 20)
        if fits or mode == "tmpfs":
            return Path(tempfile.mkdtemp(prefix=f"dynsnap-dump-{_staging_token()}-", dir=tmpfs)), "tmpfs"
    return target_parent, "target"


def _gpu_facts() -> dict:
    from . import cuda
    try:
        info = cuda.driver_info()
        devs = cuda.devices() if info.get("available") else []
    except DynsnapError:
        return {}
    return {"driver_version": info.get("driver_version"), "devices": devs}


def _compat_gpu(gpu: dict) -> dict:
    """The GPU part of the manifest's ``compat`` section: devices with MIG mode, and bytes needed per GPU UUID."""
    need: dict[str, int] = {}
    for per in (gpu.get("processes") or {}).values():
        for uuid, n in (per or {}).items():
            need[uuid] = need.get(uuid, 0) + int(n)
    devs = [{**d, "mig": " MIG " in f" {d.get('name', '')} "} for d in gpu.get("devices") or []]
    return {"driver_version": gpu.get("driver_version"), "devices": devs, "memory_needed": need}


def checkpoint(pid: int, out: str | os.PathLike | None = None, *, leave_running: bool = False,
               cuda_lock_timeout_ms: int = 10000, progress: Progress = None, engine: str = "auto",
               log: Callable[[str], Any] | None = None, extra_manifest: Optional[dict] = None) -> Snapshot:
    """Snapshot the process tree rooted at ``pid`` into ``out`` (default: a new directory under the home).

    Steps: preflight -> (CUDA lock + checkpoint) -> CRIU dump with the tree left stopped -> persist with
    checksums -> manifest -> atomic rename -> stop the tree (or, with ``leave_running``, resume it).
    On any failure the tree is resumed (CUDA restored and unlocked), staging is removed and no snapshot
    is visible.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if out is not None:
        _check_path_arg(out, "out")
    _check_engine_arg(engine)
    if not isinstance(leave_running, bool):
        raise InvalidArgument(f"leave_running must be True or False, not {leave_running!r}", stage="preflight")
    if not _is_int(cuda_lock_timeout_ms) or not 0 < cuda_lock_timeout_ms <= 86_400_000:
        raise InvalidArgument(f"cuda_lock_timeout_ms must be a positive number of milliseconds, not "
                              f"{cuda_lock_timeout_ms!r}", stage="preflight")
    _check_extra_manifest(extra_manifest)
    staging_mode = staging_setting()
    require_privilege("checkpoint")
    recover()
    proc.validate_target(pid)
    criu = find_criu()
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = snapshots_root() / f"{proc.comm(pid)}-{pid}-{stamp}"
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        raise SnapshotExists(f"{out} already exists; choose another --out or remove it", stage="preflight",
                             path=str(out))
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create {parent}: {e.strerror}", stage="preflight", path=str(parent),
                           errno=e.errno) from None
    freed = clean_stale_staging(parent)
    if log and freed:
        log(f"removed {len(freed)} stale staging director{'y' if len(freed) == 1 else 'ies'} of killed runs "
            f"({sum(n for _, n in freed) / 2**20:.1f} MiB)")
    pids = proc.tree(pid)
    tree_lock = TreeLock(pids)         # a second checkpoint of this tree is refused until this one is done
    try:
        for p in pids:
            tracer = traced_by(p)
            if tracer:
                raise InvalidTarget(f"cannot checkpoint pid {pid}: pid {p} is traced by pid {tracer} "
                                    f"({proc.comm(tracer)}), a debugger or another CRIU; detach it first",
                                    stage="preflight", pid=pid)
        problems = proc.unsupported_resources(pids)
        if problems:
            raise InvalidTarget(f"cannot checkpoint pid {pid}: {problems[0]}", stage="preflight", pid=pid)
        return _checkpoint_locked(pid, pids, out, parent, criu, staging_mode, t_start, timings,
                                  leave_running=leave_running, cuda_lock_timeout_ms=cuda_lock_timeout_ms,
                                  progress=progress, engine=engine, log=log, extra_manifest=extra_manifest)
    finally:
        tree_lock.release()


def _checkpoint_locked(pid: int, pids: list[int], out: Path, parent: Path, criu, staging_mode: str,
                       t_start: float, timings: dict, *, leave_running: bool, cuda_lock_timeout_ms: int,
                       progress: Progress, engine: str, log: Callable[[str], Any] | None,
                       extra_manifest: Optional[dict]) -> Snapshot:
    """checkpoint() once the tree is locked against a concurrent checkpoint."""
    cmd = proc.cmdline(pid)
    rss = sum(proc.rss_bytes(p) for p in pids)
    shell_job = proc.session_id(pid) != pid
    pid_namespace = proc.pid_namespace_init(pid)      # `dynsnap run`: restores into a fresh pid namespace
    mount_namespace = proc.mount_namespace(pid) == "own"   # ... and a fresh mount namespace with its own /proc
    if log and proc.has_tty(pid):
        log(f"note: pid {pid} has a terminal on its stdio; its snapshot can only be restored from a terminal")
    from .compat import facts as _facts
    compat = _facts.collect(pids, host_rss=rss)     # what a restoring node must offer (before anything freezes)
    # A process its user stopped (SIGSTOP, Ctrl-Z) stays stopped whatever happens: only the others are continued.
    user_stopped = [p for p in pids if proc.state(p) in ("T", "t")]
    if log and user_stopped:
        log(f"note: pid(s) {', '.join(map(str, user_stopped))} were stopped before the checkpoint and stay stopped")
    resume = [p for p in pids if p not in user_stopped]

    staging = parent / f".{out.name}{STAGING_TAG}{os.getpid()}"
    dump_dir: Optional[Path] = None
    resumer: Optional[_Resumer] = None
    entry = Entry(pids, resume)        # on record until the tree's fate is settled (journal.recover)
    guardian = Guardian(resume, journal=entry.path)   # continues the tree if this process is killed while frozen
    entry.guardian(guardian.pid)
    t_freeze = time.perf_counter()
    cuda_tree = None
    frozen = False
    committed = False
    sigstate: dict = {}
    try:
        with _deferred_signals(sigstate):
            # GPU: which processes of the tree use CUDA (the driver says), lock all, then checkpoint all.
            gpu: dict = {}
            from . import cuda
            if cuda.is_available():
                cpids = cuda.cuda_pids(pids)
                if cpids:
                    gpu = _gpu_facts()
                    gpu["pids"] = cpids
                    if pid_namespace:   # restored with new node pids: found again by their pids inside
                        gpu["ns_pids"] = [proc.ns_ids(p)[-1] for p in cpids]
                    # per CUDA process: the GPUs it uses (UUID -> bytes), for the manifest and the estimate
                    per = {str(p): cuda.process_gpus(p) for p in cpids}
                    gpu["processes"] = per
                    gpu["memory"] = {p: (None if v is None else sum(v.values())) for p, v in per.items()}
                    compat["gpu"] = _compat_gpu(gpu)
                    if log:
                        gpu_bytes = sum(v or 0 for v in gpu["memory"].values())
                        log(f"image estimate: host RSS {rss / 2**30:.2f} GiB + GPU {gpu_bytes / 2**30:.2f} GiB "
                            f"in {len(cpids)} CUDA process(es)")
                    cuda_tree = cuda.CudaTree(cpids, timeout_ms=cuda_lock_timeout_ms)
                    entry.cuda(cpids)
                    guardian.cuda(cpids)
                    if progress:
                        progress("gpu checkpoint", 0, 1)
                    cuda_tree.lock_all()
                    _check_interrupt(sigstate, "lock")
                    cuda_tree.checkpoint_all()
                    timings.update(cuda_tree.timings)
                    _check_interrupt(sigstate, "gpu checkpoint")
            estimate = rss + sum(v or 0 for v in gpu.get("memory", {}).values())
            entry.staging(staging)
            dump_root, dump_where = choose_dump_dir(parent, estimate, staging_mode)
            if dump_where == "tmpfs":
                entry.staging(dump_root)
            if dump_where == "target":
                staging.mkdir()
                dump_dir = staging / "criu"
                dump_dir.mkdir()
            else:
                dump_dir = dump_root
            args = ["dump", "-t", str(pid), "-D", str(dump_dir), "--leave-stopped", "--file-locks"]
            if shell_job:
                args.append("--shell-job")
            if mount_namespace:
                args += CRIU_MNTNS_ARGS
            # Test hook: CRIU's own fault injection (FI_DUMP_PAGES) makes a real dump fail half-way.
            fault = {"CRIU_FAULT": "3"} if os.environ.get("DYNSNAP_FAULT") == "dump" else None
            if progress:
                progress("criu dump", 0, 1)
            frozen = True       # from here on, a failure must resume the tree (CRIU may leave it stopped)
            timings["criu_dump"] = criu.run(args, log=dump_dir / "dump.log", stage="dump", pid=pid, env=fault,
                                            on_start=lambda c: (entry.criu(c), guardian.criu(c)))
            proc.wait_stopped(pids)
            _check_interrupt(sigstate, "dump")
            if leave_running:
                # The images are complete in staging: the worker goes back to work while they are persisted.
                resumer = _Resumer(resume, cuda_tree, t_freeze)

            # persist: stream the images to the target file system with checksums (C engine).
            t0 = time.perf_counter()
            files, engine_used = _persist(dump_dir, dump_where, staging, engine, progress, sigstate)
            timings["persist"] = time.perf_counter() - t0
            _check_interrupt(sigstate, "persist")

            manifest = {
                "magic": mf.MAGIC, "format": mf.FORMAT_VERSION, "checksum": mf.CHECKSUM,
                "dynsnap_version": _version(), "criu_version": criu.version_str,
                "kernel": platform.release(), "host": socket.gethostname(), "arch": platform.machine(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "created_unix": time.time(), "root_pid": pid, "pids": pids, "cmdline": cmd,
                "comm": proc.comm(pid), "shell_job": shell_job, "pid_namespace": pid_namespace,
                "mount_namespace": mount_namespace, "leave_running": leave_running,
                "host_rss_bytes": rss, "files": files, "total_bytes": sum(f["size"] for f in files),
                "io_engine": engine_used, "dump_staging": dump_where, "cuda": gpu or None,
                "timings": timings, "compat": compat,
            }
            for key, value in (extra_manifest or {}).items():
                if key in manifest or key == mf.ROOT_KEY:
                    raise InvalidArgument(f"extra_manifest may not override {key!r}", stage="preflight")
                manifest[key] = value
            timings["total"] = time.perf_counter() - t_start
            mf.write(staging, manifest)
            _rename_noreplace(staging, out)
            committed = True
            fsync_path(parent)
    except BaseException as e:
        if isinstance(e, CriuError):
            _keep_log(e)
        if resumer is not None:
            resumer.wait(raise_errors=False)
        if not committed:
            _rollback(resume, frozen, cuda_tree)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if dump_dir is not None and not str(dump_dir).startswith(str(staging)):
            shutil.rmtree(dump_dir, ignore_errors=True)
        if not committed:
            guardian.done()
            entry.settle()
    # The snapshot is durable. Now finish the tree's fate.
    try:
        if resumer is not None:
            resumer.wait(raise_errors=True)
            manifest["timings"].update(resumer.timings)
        else:
            proc.kill_tree(pids, signal.SIGKILL)
    finally:
        guardian.done()
        entry.settle()
    return Snapshot(out, manifest)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that never replaces: renameat2(RENAME_NOREPLACE), so a snapshot that appeared meanwhile wins."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    fn = getattr(libc, "renameat2", None)
    if fn is None:                                   # very old libc: fall back to a checked rename
        if dst.exists():
            raise SnapshotExists(f"{dst} already exists; choose another --out or remove it", stage="commit",
                                 path=str(dst))
        os.rename(src, dst)
        return
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise SnapshotExists(f"{dst} appeared while the snapshot was being written; it was left as it is",
                                 stage="commit", path=str(dst))
        raise StorageError(f"cannot commit the snapshot to {dst}: {os.strerror(err)}", stage="commit",
                           path=str(dst), errno=err)


def _keep_log(e: CriuError) -> None:
    """CRIU's log lives in the staging area that is about to be removed: keep a copy under the home's logs/."""
    if not e.log or not os.path.exists(e.log):
        return
    logs = default_home() / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = logs / f"{e.stage}-{e.pid or 'x'}-{stamp}-{os.getpid()}.log"
        try:
            os.rename(e.log, dest)          # same file system: needs no space, works on a full disk
        except OSError:
            shutil.copyfile(e.log, dest)
        e.log = str(dest)
    except OSError as err:
        # never point at a log inside the staging that is about to be removed
        e.message += f" (CRIU's log could not be kept in {logs}: {err.strerror or err})"
        e.log = None


class _Resumer:
    """Puts a frozen source tree back to work (SIGCONT, then CUDA restore + unlock) in a background thread."""

    def __init__(self, pids: list[int], cuda_tree, t_freeze: float):
        import threading
        self.timings: dict[str, float] = {}
        self.error: Optional[BaseException] = None
        self._pids, self._cuda, self._t_freeze = pids, cuda_tree, t_freeze
        self._thread = threading.Thread(target=self._run, name="dynsnap-resume", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            proc.kill_tree(self._pids, signal.SIGCONT)
            if self._cuda is not None:
                self._cuda.restore_all()
                self._cuda.unlock_all()
                self.timings["resume_gpu_restore"] = self._cuda.timings.get("gpu_restore", 0.0)
                self.timings["resume_unlock"] = self._cuda.timings.get("unlock", 0.0)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self.error = e
        end = time.perf_counter()
        self.timings["resume"] = end - t0
        self.timings["frozen"] = end - self._t_freeze

    def wait(self, raise_errors: bool) -> None:
        self._thread.join()
        if self.error is not None and raise_errors:
            if self._cuda is not None:
                self._cuda.rollback()
            raise self.error


def _rollback(pids: list[int], frozen: bool, cuda_tree) -> None:
    """Put the source tree back to running: continue it if we froze it, then CUDA restore + unlock."""
    if frozen:
        proc.kill_tree(pids, signal.SIGCONT)
    if cuda_tree is not None:
        cuda_tree.rollback()


def _persist(dump_dir: Path, dump_where: str, staging: Path, engine: str, progress: Progress,
             sigstate: dict) -> tuple[list[dict], str]:
    from . import io as dio

    def cb(done: int, total: int) -> None:
        if progress:
            progress("persist", done, total)
        _check_interrupt(sigstate, "persist")

    try:
        if dump_where == "tmpfs":
            staging.mkdir()
            res = dio.copy_tree(str(dump_dir), str(staging / "criu"), engine=engine, direct=True,
                                checksum=True, fsync=True, progress=cb)
            files = [{"path": f"criu/{f.path}", "size": f.size, "xxh3": f.xxh3} for f in res.files]
            used = res.engine
        else:
            # CRIU wrote straight into staging on the target file system (page cache, already being written
            # back): hash from memory and fsync, several files at once.
            import concurrent.futures as cf
            paths = sorted((p for p in dump_dir.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
            total = sum(p.stat().st_size for p in paths)

            def one(p: Path) -> dict:
                r = dio.hash_file(str(p), engine=engine, direct=False)
                fsync_path(p)
                return {"path": str(p.relative_to(staging)), "size": r.size, "xxh3": r.xxh3}
            with cf.ThreadPoolExecutor(max_workers=4) as pool:
                futs = [pool.submit(one, p) for p in paths]
                done = 0
                for f in cf.as_completed(futs):
                    done += f.result()["size"]          # the first failure propagates from here
                    cb(done, total)
                files = [f.result() for f in futs]
            used = dio.available_engines()[0] if engine == "auto" else engine
            fsync_path(dump_dir)
    except OSError as e:
        name = e.filename or str(staging)
        raise StorageError(f"writing the snapshot failed at {name}: {os.strerror(e.errno or 5)}",
                           stage="persist", path=name, errno=e.errno) from None
    files.sort(key=lambda f: f["path"])
    return files, used


def _check_devices(m: dict) -> None:
    gpu = m.get("cuda")
    if not gpu:
        return
    from . import cuda
    if not cuda.is_available():
        reason = cuda.driver_info().get("reason") or "no CUDA driver with the checkpoint API"
        raise CudaUnavailable(f"this snapshot holds GPU state but this machine cannot restore it: {reason}",
                              stage="preflight")
    have = cuda.devices()
    want = gpu.get("devices") or []
    want_names = sorted(d.get("name") for d in want)
    have_names = sorted(d.get("name") for d in have)[:len(want_names)]
    if want_names and want_names != have_names:
        raise CudaDeviceMismatch(
            f"snapshot was taken on {', '.join(want_names)} but this machine has "
            f"{', '.join(have_names) or 'no GPU'}; CUDA restore needs the same chip type", stage="preflight")


PREFETCH_MODES = ("pagecache", "tmpfs")


def _prefetch_tmpfs(snap: Snapshot, engine: str, verify: bool) -> tuple[Path, float]:
    """Copy the CRIU images into tmpfs with the C engine (O_DIRECT reads, inline xxh3), checking every
    checksum against the manifest on the way; return the tmpfs directory CRIU then restores from."""
    from . import io as dio
    tmpfs = _tmpfs_dir()
    if tmpfs is None:
        raise StorageError("restore prefetch 'tmpfs' needs a writable tmpfs (/dev/shm or $DYNSNAP_TMPFS)",
                           stage="restore")
    dest = Path(tempfile.mkdtemp(prefix=f"dynsnap-restore-{_staging_token()}-", dir=tmpfs))
    t0 = time.perf_counter()
    try:
        res = dio.copy_tree(str(snap.path / "criu"), str(dest / "criu"), engine=engine, direct=True,
                            checksum=verify, fsync=False)
        if verify:
            want = {f["path"]: f for f in snap.manifest["files"]}
            for f in res.files:
                rec = want.get(f"criu/{f.path}")
                if rec is not None and (rec["size"] != f.size or rec["xxh3"] != f.xxh3):
                    bad = snap.path / "criu" / f.path
                    raise SnapshotCorrupt(f"{bad} does not match its checksum (xxh3 {f.xxh3}, manifest says "
                                          f"{rec['xxh3']}): the file was altered or damaged", stage="verify",
                                          path=str(bad))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest, time.perf_counter() - t0


def restore(path: str | os.PathLike, *, verify: bool = True, device_map: Optional[dict] = None,
            progress: Progress = None, engine: str = "auto", verify_threads: int = 4,
            prefetch: Optional[str] = None, log_dir: Optional[Path] = None,
            thp: Optional[bool] = None, lazy: Optional[bool] = None) -> RestoredProcess:
    """Verify a snapshot and bring its process tree back (detached); return the restored root.

    ``thp`` (default: ``$DYNSNAP_RESTORE_THP`` is ``always``) sets the host's transparent huge pages to `always`
    while CRIU restores, so the tree's memory comes back in 2 MiB pages (dynsnap_core/thp_scope.py: host-wide,
    opt-in, put back on every exit path).

    Steps: manifest (parsed with limits, root digest) + closed-set check (exactly the listed regular files, each
    of its size) -> device check -> checksums of the small images (everything but memory pages) -> [checksums
    of the pages in parallel threads || CRIU restore with the tree left stopped] -> (if every checksum matched)
    continue the tree -> CUDA restore -> unlock. CRIU never reads a metadata image that failed verification; a
    pages file that fails stops CRIU at once. CRIU runs under a supervisor (dynsnap_core/supervise.py) that kills
    CRIU and every process it restored unless the restore completes, even when dynsnap is killed; CRIU's run
    time and log size are bounded (``criu.run_limits``).

    ``prefetch`` (default ``$DYNSNAP_RESTORE_PREFETCH`` or ``pagecache``): ``pagecache`` is the overlapped
    path above; ``tmpfs`` first copies and checks the images into tmpfs with the C engine, then CRIU
    restores from memory (``dynsnap bench restore`` measures both; page cache was faster, see RESULTS.md).

    ``lazy`` (default: on where userfaultfd works, for snapshots without CUDA state; ``$DYNSNAP_RESTORE_LAZY``):
    CRIU's lazy-pages daemon fills the memory while the tree runs; the tree is still continued only after every
    checksum matched, and is killed if the fill fails (dynsnap_core/lazy_pages.py). ``RestoredProcess.wait_filled``.
    """
    import concurrent.futures as cf
    import threading

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    _check_path_arg(path, "path")
    _check_engine_arg(engine)
    if device_map is not None and not (isinstance(device_map, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in device_map.items())):
        raise InvalidArgument("device_map must be a dict of GPU UUID strings (old -> new)", stage="preflight")
    if not _is_int(verify_threads) or not 1 <= verify_threads <= 256:
        raise InvalidArgument(f"verify_threads must be an integer from 1 to 256, not {verify_threads!r}",
                              stage="preflight")
    prefetch = prefetch or os.environ.get("DYNSNAP_RESTORE_PREFETCH") or "pagecache"
    if thp is None:
        env_thp = os.environ.get("DYNSNAP_RESTORE_THP", "")
        if env_thp not in ("", "always", "off"):
            raise InvalidArgument(f"DYNSNAP_RESTORE_THP={env_thp!r}: use 'always' or 'off'", stage="preflight")
        thp = env_thp == "always"
    elif not isinstance(thp, bool):
        raise InvalidArgument(f"thp must be True or False, not {thp!r}", stage="preflight")
    if prefetch not in PREFETCH_MODES:
        raise InvalidArgument(f"unknown restore prefetch mode {prefetch!r}: use one of {', '.join(PREFETCH_MODES)}",
                              stage="preflight")
    require_privilege("restore")
    recover()
    clean_stale_staging()
    snap = open_snapshot(path)
    m = snap.manifest
    from .compat import require as _require_compatible
    _require_compatible(snap)       # every fact the snapshot needs, before anything is touched
    criu = find_criu()
    _check_devices(m)
    lazy = lazy_pages.choose(lazy, criu, m, prefetch, thp)      # dynsnap_core/lazy_pages.py (issue 12)
    mf.check_closed(snap.path, m)
    crit_timeout, log_limit = run_limits(m["total_bytes"])
    pid = m["root_pid"]
    # a tree that had a pid namespace of its own gets a fresh one: the node's pids do not matter
    for p in [] if m.get("pid_namespace") else (m.get("pids") or [pid]):
        if proc.exists(p):
            raise DynsnapError(f"pid {p} is in use by a running process ({proc.comm(p)}); a snapshot restores "
                               "with its original pids, so stop that process first", stage="restore", pid=p)
        if proc.state(p) == "Z":
            raise DynsnapError(f"pid {p} is held by a zombie that its parent (pid {proc.parent(p)}) has not "
                               "reaped yet; a snapshot restores with its original pids", stage="restore", pid=p)
    log_dir = Path(log_dir) if log_dir else default_home() / "logs"
    images = snap.path / "criu"
    staged: Optional[Path] = None
    if verify and prefetch != "tmpfs":
        # CRIU never reads a metadata image that failed verification: check them all before it starts.
        t0 = time.perf_counter()
        mf.verify_files(snap.path, m, engine=engine, direct=False, threads=verify_threads, closed=False,
                        only=lambda f: not mf.is_bulk(f))
        timings["verify_metadata"] = time.perf_counter() - t0
    if prefetch == "tmpfs":
        if progress:
            progress("prefetch to tmpfs" + (" + verify" if verify else ""), 0, 1)
        staged, timings["prefetch"] = _prefetch_tmpfs(snap, engine, verify)
        images = staged / "criu"
    try:
        work = _restore_workdir(log_dir)
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    pidfile = work / "pid"
    args = ["restore", "-D", str(images), "-W", str(work), "-d", "--pidfile", str(pidfile),
            "--file-locks"]
    if m.get("mount_namespace"):
        # a fresh mount namespace over the node's root, with the node's mounts bound in by path
        args += ["--root", "/", *CRIU_MNTNS_ARGS]
    if m.get("pid_namespace"):
        # a copy beside a running one: abstract socket names it holds (the CUDA driver binds one) are taken
        try:
            renamed = criu_images.rename_taken_abstract_sockets(images, work / "images",
                                                                lambda copy: _check_copy(copy, snap.path, m))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)      # CRIU never ran: nothing worth keeping
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            raise
        if renamed:
            args[args.index(str(images))] = str(work / "images")
            timings["abstract_sockets_renamed"] = len(renamed)
    if m.get("shell_job"):
        # A shell job lands in our session; left stopped, it would be an orphaned stopped process group when
        # CRIU exits, and the kernel would SIGHUP it. So verify first, then restore it running.
        args.append("--shell-job")
        if verify and staged is None:
            t0 = time.perf_counter()
            mf.verify_files(snap.path, m, engine=engine, direct=False, threads=verify_threads, closed=False,
                            only=mf.is_bulk)
            timings["verify"] = time.perf_counter() - t0
            verify = False
    else:
        args.append("--leave-stopped")

    sigstate: dict = {}
    cancel = threading.Event()
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynsnap-verify")
    vfut = None
    run = None
    rpid: Optional[int] = None
    filler = None                               # lazy restore (issue 12)

    def check() -> None:
        """Raised out of CRIU's wait: a signal to dynsnap, or a pages file that failed verification."""
        if sigstate.get("signal"):
            name = signal.Signals(sigstate["signal"]).name
            raise Interrupted(f"restore interrupted by {name}; nothing was restored (CRIU and the half-restored "
                              "processes were killed)", stage="restore")
        if vfut is not None and vfut.done() and vfut.exception() is not None:
            raise vfut.exception()              # type: ignore[misc]

    def wait_verified() -> None:
        while vfut is not None and not vfut.done():
            check()
            time.sleep(0.01)
        check()

    try:
        with _deferred_signals(sigstate):
            if verify and staged is None:
                def _verify() -> float:
                    t0 = time.perf_counter()
                    mf.verify_files(snap.path, m, engine=engine, direct=False, threads=verify_threads, closed=False,
                                    only=mf.is_bulk, cancel=cancel)
                    return time.perf_counter() - t0
                vfut = pool.submit(_verify)
            if progress:
                progress("criu restore" + (" + verify" if verify else ""), 0, 1)
            # A shell job re-attaches to a terminal: give CRIU ours when we have one.
            with thp_scope.ThpScope() if thp else contextlib.nullcontext() as scope:
                if scope is not None:
                    timings["thp_always"] = float(scope.active)
                start = lazy_pages.starter(criu, lazy, work, crit_timeout)     # criu.start_supervised unless lazy
                run = start(args, log=work / "restore.log", stage="restore", pid=pid,
                            inherit_stdin=bool(m.get("shell_job")) and os.isatty(0), journal=restore_entry())
                try:
                    timings["criu_restore"] = run.wait(timeout=crit_timeout, log_limit=log_limit, check=check)
                except CriuError:
                    wait_verified()     # a damaged snapshot explains a CRIU failure better than CRIU does
                    raise
            wait_verified()
            if vfut is not None:
                timings["verify"] = vfut.result()
            try:
                rpid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                rpid = pid
            timings["criu_restore_and_verify"] = time.perf_counter() - t_start
            tree_pids = proc.tree(rpid)
            proc.kill_tree(tree_pids, signal.SIGCONT)
            gpu = m.get("cuda")
            if gpu and gpu.get("pids"):
                from . import cuda
                ctree = cuda.CudaTree(_restored_cuda_pids(gpu, tree_pids, bool(m.get("pid_namespace"))))
                if progress:
                    progress("gpu restore", 0, 1)
                ctree.restore_all(device_map=device_map)
                ctree.unlock_all()
                timings.update(ctree.timings)
            check()
            if lazy:        # the tree runs; its supervisor keeps it until every page is in, then releases it
                filler = lazy_pages.Fill(run, t_start, timings)
            else:
                run.release()
    except BaseException:
        cancel.set()
        if run is not None:
            run.kill()                  # CRIU and every process it restored: none outlives a failed restore
        else:
            shutil.rmtree(work, ignore_errors=True)     # CRIU never ran: no log worth keeping
        raise
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_start
    if os.environ.get("DYNSNAP_KEEP_LOGS") is None and filler is None:
        shutil.rmtree(work, ignore_errors=True)
    return RestoredProcess(rpid, snap, timings, fill=filler)


def _restore_workdir(log_dir: Path) -> Path:
    """CRIU's work directory for one restore (its log and the pidfile), refusing a full file system up front."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(log_dir)
        if st.f_bavail * st.f_frsize < MIN_LOG_SPACE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(tempfile.mkdtemp(prefix=f"restore-{stamp}-", dir=log_dir))
    except OSError as e:
        what = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
        raise StorageError(f"cannot prepare CRIU's restore log in {log_dir}: {what} (CRIU's log and pidfile go "
                           f"there: free {MIN_LOG_SPACE >> 20} MiB or set DYNSNAP_HOME elsewhere)", stage="restore",
                           path=str(log_dir), errno=e.errno) from None


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


def _check_copy(copy: Path, snap_dir: Path, m: dict) -> None:
    """A copy of a snapshot's criu/files.img matches the manifest's size and checksum (SnapshotCorrupt if not)."""
    from . import io as dio
    want = next((f for f in m.get("files", []) if f.get("path") == "criu/files.img"), None)
    got = dio.hash_file(str(copy), direct=False)
    if want is None or got.size != want["size"] or got.xxh3 != want["xxh3"]:
        raise SnapshotCorrupt(f"{snap_dir / 'criu' / 'files.img'} does not match its checksum in the manifest: the "
                              "file was altered or damaged", stage="verify", path=str(snap_dir / "criu" / "files.img"))


def _restored_cuda_pids(gpu: dict, tree_pids: list[int], pid_namespace: bool) -> list[int]:
    """The node pids of the restored CUDA processes: the recorded ones, or, for a tree restored into a fresh
    pid namespace, the processes of the restored tree with the recorded pids inside the namespace."""
    if not pid_namespace:
        return list(gpu["pids"])
    inside = gpu.get("ns_pids")
    if not inside or len(inside) != len(gpu["pids"]):
        raise SnapshotCorrupt("the snapshot's GPU section does not say which processes of its pid namespace use "
                              "CUDA (ns_pids); take the snapshot again with this dynsnap", stage="gpu restore")
    by_inner = {ids[-1]: p for p in tree_pids if (ids := proc.ns_ids(p))}
    missing = [n for n in inside if n not in by_inner]
    if missing:
        raise DynsnapError(f"the restored tree has no process with pid {missing[0]} inside its namespace, which "
                           "used CUDA when the snapshot was taken", stage="gpu restore")
    return [by_inner[n] for n in inside]


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

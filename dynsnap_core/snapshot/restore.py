"""Opening a snapshot (Snapshot, open_snapshot) and bringing it back: checks, prefetch, CRIU restore under a
supervisor, GPU restore, unlock, resume (RestoredProcess)."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as _dt
import errno
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import criu_images, lazy_pages, thp_scope
from . import manifest as mf
from . import verify as sv
from .. import config, proc
from ..criu import find_criu, require_privilege, run_limits
from ..journal import recover, restore_entry
from ..errors import (CriuError, CudaDeviceMismatch, CudaUnavailable, DynsnapError, Interrupted, InvalidArgument,
                     SnapshotCorrupt, StorageError)
from .store import (CRIU_MNTNS_ARGS, Progress, _check_engine_arg, _check_path_arg, _deferred_signals, _is_int,
                    _staging_token, _tmpfs_dir, clean_stale_staging, default_home, remove, resolve)

__all__ = ["Snapshot", "RestoredProcess", "restore", "open_snapshot", "PREFETCH_MODES"]

MIN_LOG_SPACE = 4 << 20          # free space a restore needs in the home's logs/ (CRIU's log and pidfile)


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
        return sv.verify_files(self.path, self.manifest, direct=not prefetch, progress=cb)

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


def _check_devices(m: dict) -> None:
    gpu = m.get("cuda")
    if not gpu:
        return
    from .. import cuda
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
    from .. import io as dio
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
    t_start = time.perf_counter()
    _check_path_arg(path, "path")
    _check_engine_arg(engine)
    if device_map is not None and not (isinstance(device_map, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in device_map.items())):
        raise InvalidArgument("device_map must be a dict of GPU UUID strings (old -> new)", stage="preflight")
    if not _is_int(verify_threads) or not 1 <= verify_threads <= 256:
        raise InvalidArgument(f"verify_threads must be an integer from 1 to 256, not {verify_threads!r}",
                              stage="preflight")
    prefetch = prefetch or config.get("restore_prefetch") or "pagecache"
    if thp is None:
        env_thp = config.get("restore_thp") or ""
        if env_thp not in ("", "always", "off"):
            raise InvalidArgument(f"DYNSNAP_RESTORE_THP={env_thp!r}: use 'always' or 'off'", stage="preflight")
        thp = env_thp == "always"
    elif not isinstance(thp, bool):
        raise InvalidArgument(f"thp must be True or False, not {thp!r}", stage="preflight")
    if prefetch not in PREFETCH_MODES:
        raise InvalidArgument(f"unknown restore prefetch mode {prefetch!r}: use one of {', '.join(PREFETCH_MODES)}",
                              stage="preflight")
    require_privilege("restore")
    return _Restore(path, t_start, verify=verify, device_map=device_map, progress=progress, engine=engine,
                    verify_threads=verify_threads, prefetch=prefetch, log_dir=log_dir, thp=thp, lazy=lazy).run()


class _Restore:
    """One restore; ``run()`` reads as its phases in order (each a method below)."""

    def __init__(self, path: Any, t_start: float, *, verify: bool, device_map: Optional[dict], progress: Progress,
                 engine: str, verify_threads: int, prefetch: str, log_dir: Optional[Path], thp: bool,
                 lazy: Optional[bool]):
        self.path, self.t_start, self.verify, self.device_map = path, t_start, verify, device_map
        self.progress, self.engine, self.verify_threads, self.prefetch = progress, engine, verify_threads, prefetch
        self.log_dir, self.thp, self.lazy = log_dir, thp, lazy
        self.timings: dict[str, float] = {}
        self.staged: Optional[Path] = None           # prefetch 'tmpfs': the verified copy CRIU reads
        self.work: Optional[Path] = None             # CRIU's work directory (log, pidfile)
        self.renamed: dict[bytes, bytes] = {}        # abstract socket names given fresh ones for this copy
        self.gms_prep: Any = None                    # weight sets made resident by the GPU memory service
        self.sigstate: dict = {}
        self.cancel = threading.Event()
        self.vfut: Optional[cf.Future] = None        # the pages' checksums, beside CRIU
        self.run_: Any = None                        # the supervised CRIU
        self.rpid: Optional[int] = None
        self.filler: Any = None                      # lazy restore: the fill that goes on after we return

    def run(self) -> RestoredProcess:
        self.open()
        self.verify_metadata()
        self.prefetch_tmpfs()
        try:
            self.prepare_criu()
        except BaseException:
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)      # CRIU never ran: nothing worth keeping
            if self.staged is not None:
                shutil.rmtree(self.staged, ignore_errors=True)
            raise
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynsnap-verify")
        try:
            with _deferred_signals(self.sigstate):
                self.start_verify(pool)
                self.criu_restore()
                self.continue_tree()
                self.gpu_restore()
                self.resume_agents()
                self.check()
                self.release()
        except BaseException:
            self.cancel.set()
            if self.run_ is not None:
                self.run_.kill()        # CRIU and every process it restored: none outlives a failed restore
            else:
                shutil.rmtree(self.work, ignore_errors=True)     # CRIU never ran: no log worth keeping
            raise
        finally:
            self.cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if self.staged is not None:
                shutil.rmtree(self.staged, ignore_errors=True)
        self.timings["total"] = time.perf_counter() - self.t_start
        if config.get("keep_logs") is None and self.filler is None:
            shutil.rmtree(self.work, ignore_errors=True)
        return RestoredProcess(self.rpid, self.snap, self.timings, fill=self.filler)

    def open(self) -> None:
        """Journal recovery, the manifest and every fact the snapshot needs, before anything is touched."""
        recover()
        clean_stale_staging()
        self.snap = snap = open_snapshot(self.path)
        self.m = m = snap.manifest
        from ..compat import require as _require_compatible
        _require_compatible(snap)
        self.criu = find_criu()
        _check_devices(m)
        # A worker whose GPU regions live in the GPU memory service: its weight sets are made resident (and their
        # layout hashes checked) by the service in a thread while the images are verified and CRIU restores.
        from ..gms import wiring
        self.gms_prep = wiring.before_restore(m["gms"]) if m.get("gms") else None
        sv.check_closed(snap.path, m)
        self.lazy = lazy_pages.choose(self.lazy, self.criu, m, self.prefetch, self.thp)   # dynsnap_core/lazy_pages.py
        self.crit_timeout, self.log_limit = run_limits(m["total_bytes"])
        self.pid = pid = m["root_pid"]
        # a tree that had a pid namespace of its own gets a fresh one: the node's pids do not matter
        for p in [] if m.get("pid_namespace") else (m.get("pids") or [pid]):
            if proc.exists(p):
                raise DynsnapError(f"pid {p} is in use by a running process ({proc.comm(p)}); a snapshot restores "
                                   "with its original pids, so stop that process first", stage="restore", pid=p)
            if proc.state(p) == "Z":
                raise DynsnapError(f"pid {p} is held by a zombie that its parent (pid {proc.parent(p)}) has not "
                                   "reaped yet; a snapshot restores with its original pids", stage="restore", pid=p)
        self.log_dir = Path(self.log_dir) if self.log_dir else default_home() / "logs"
        self.images = snap.path / "criu"

    def _verify(self, only: Any, cancel: Optional[threading.Event] = None) -> float:
        t0 = time.perf_counter()
        sv.verify_files(self.snap.path, self.m, engine=self.engine, direct=False, threads=self.verify_threads,
                        closed=False, only=only, cancel=cancel)
        return time.perf_counter() - t0

    def verify_metadata(self) -> None:
        """CRIU never reads a metadata image that failed verification: check them all before it starts."""
        if self.verify and self.prefetch != "tmpfs":
            self.timings["verify_metadata"] = self._verify(lambda f: not sv.is_bulk(f))

    def prefetch_tmpfs(self) -> None:
        """Prefetch 'tmpfs': a checked copy of the images in memory, which CRIU then reads."""
        if self.prefetch == "tmpfs":
            if self.progress:
                self.progress("prefetch to tmpfs" + (" + verify" if self.verify else ""), 0, 1)
            self.staged, self.timings["prefetch"] = _prefetch_tmpfs(self.snap, self.engine, self.verify)
            self.images = self.staged / "criu"

    def prepare_criu(self) -> None:
        """CRIU's work directory and arguments: namespaces, renamed abstract sockets, shell jobs."""
        m = self.m
        self.work = work = _restore_workdir(self.log_dir)
        self.pidfile = work / "pid"
        args = ["restore", "-D", str(self.images), "-W", str(work), "-d", "--pidfile", str(self.pidfile),
                "--file-locks"]
        if m.get("mount_namespace"):
            # a fresh mount namespace over the node's root, with the node's mounts bound in by path
            args += ["--root", "/", *CRIU_MNTNS_ARGS]
        if m.get("pid_namespace"):
            # a copy beside a running one: abstract socket names it holds (the CUDA driver binds one) are taken
            self.renamed = criu_images.rename_taken_abstract_sockets(
                self.images, work / "images", lambda copy: _check_copy(copy, self.snap.path, m))
            if self.renamed:
                args[args.index(str(self.images))] = str(work / "images")
                self.timings["abstract_sockets_renamed"] = len(self.renamed)
        if m.get("shell_job"):
            # A shell job lands in our session; left stopped, it would be an orphaned stopped process group when
            # CRIU exits, and the kernel would SIGHUP it. So verify first, then restore it running.
            args.append("--shell-job")
            if self.verify and self.staged is None:
                self.timings["verify"] = self._verify(sv.is_bulk)
                self.verify = False
        else:
            args.append("--leave-stopped")
        self.args = args

    def check(self) -> None:
        """Raised out of CRIU's wait: a signal to dynsnap, or a pages file that failed verification."""
        if self.sigstate.get("signal"):
            name = signal.Signals(self.sigstate["signal"]).name
            raise Interrupted(f"restore interrupted by {name}; nothing was restored (CRIU and the half-restored "
                              "processes were killed)", stage="restore")
        vfut = self.vfut
        if vfut is not None and vfut.done() and vfut.exception() is not None:
            raise vfut.exception()              # type: ignore[misc]

    def wait_verified(self) -> None:
        while self.vfut is not None and not self.vfut.done():
            self.check()
            time.sleep(0.01)
        self.check()

    def start_verify(self, pool: cf.ThreadPoolExecutor) -> None:
        """The pages' checksums in a thread, beside CRIU (through the page cache: the disk is read once)."""
        if self.verify and self.staged is None:
            self.vfut = pool.submit(self._verify, sv.is_bulk, self.cancel)

    def criu_restore(self) -> None:
        """CRIU restores the tree, left stopped, under the supervisor; every checksum must have matched."""
        m, timings = self.m, self.timings
        if self.progress:
            self.progress("criu restore" + (" + verify" if self.verify else ""), 0, 1)
        with thp_scope.ThpScope() if self.thp else contextlib.nullcontext() as scope:
            if scope is not None:
                timings["thp_always"] = float(scope.active)
            start = lazy_pages.starter(self.criu, self.lazy, self.work, self.crit_timeout)   # supervised CRIU
            # A shell job re-attaches to a terminal: give CRIU ours when we have one.
            self.run_ = start(self.args, log=self.work / "restore.log", stage="restore", pid=self.pid,
                              inherit_stdin=bool(m.get("shell_job")) and os.isatty(0), journal=restore_entry())
            try:
                timings["criu_restore"] = self.run_.wait(timeout=self.crit_timeout, log_limit=self.log_limit,
                                                         check=self.check)
            except CriuError:
                self.wait_verified()     # a damaged snapshot explains a CRIU failure better than CRIU does
                raise
        self.wait_verified()
        if self.vfut is not None:
            timings["verify"] = self.vfut.result()
        try:
            self.rpid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            self.rpid = self.pid
        timings["criu_restore_and_verify"] = time.perf_counter() - self.t_start

    def continue_tree(self) -> None:
        self.tree_pids = proc.tree(self.rpid)
        proc.kill_tree(self.tree_pids, signal.SIGCONT)

    def gpu_restore(self) -> None:
        """Every CUDA process of the tree (found by its pid inside a fresh namespace): restore all, unlock all."""
        gpu = self.m.get("cuda")
        if gpu and gpu.get("pids"):
            from .. import cuda
            ctree = cuda.CudaTree(_restored_cuda_pids(gpu, self.tree_pids, bool(self.m.get("pid_namespace"))))
            if self.progress:
                self.progress("gpu restore", 0, 1)
            ctree.restore_all(device_map=self.device_map)
            ctree.unlock_all()
            self.timings.update(ctree.timings)

    def resume_agents(self) -> None:
        """The weight sets are resident (loaded beside CRIU's restore): the agents map them back and serve."""
        if self.gms_prep is not None:
            from ..gms import wiring
            if self.progress:
                self.progress("resume", 0, 1)
            self.timings.update(wiring.flat_timings(wiring.after_restore(self.m["gms"], self.gms_prep,
                                                                         self.renamed)))

    def release(self) -> None:
        """The supervisor lets the tree go; lazy: it keeps it until every page is in, then lets it go."""
        if self.lazy:
            self.filler = lazy_pages.Fill(self.run_, self.t_start, self.timings)
        else:
            self.run_.release()


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


def _check_copy(copy: Path, snap_dir: Path, m: dict) -> None:
    """A copy of a snapshot's criu/files.img matches the manifest's size and checksum (SnapshotCorrupt if not)."""
    from .. import io as dio
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



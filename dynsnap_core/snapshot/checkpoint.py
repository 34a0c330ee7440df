"""Taking a snapshot: freeze the tree, lock CUDA, CRIU dump (to tmpfs when it fits), persist, verify, commit
the directory atomically; roll back on any failure or signal."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from . import manifest as mf
from .. import config, proc
from ..criu import find_criu, require_privilege
from ..durable import fsync_path, rename_noreplace
from ..guardian import Guardian
from ..journal import Entry, TreeLock, recover, traced_by
from ..errors import (CriuError, DynsnapError, Interrupted, InvalidArgument, InvalidTarget, SnapshotExists,
                     StorageError)
from .restore import Snapshot
from .store import (CRIU_MNTNS_ARGS, STAGING_TAG, Progress, _check_engine_arg, _check_path_arg, _deferred_signals,
                    _is_int, _staging_token, _tmpfs_dir, clean_stale_staging, default_home, snapshots_root)

__all__ = ["checkpoint", "choose_dump_dir", "staging_setting", "STAGING_MODES"]


def _version() -> str:
    from .._version import __version__
    return __version__


def _check_interrupt(state: dict, stage: str) -> None:  # checkpoint's safe points
    if state.get("signal"):
        name = signal.Signals(state["signal"]).name
        raise Interrupted(f"checkpoint interrupted by {name} during {stage}; nothing was kept", stage=stage)


STAGING_MODES = ("auto", "tmpfs", "target")


def staging_setting() -> str:
    """$DYNSNAP_STAGING checked: auto (default), tmpfs or target; anything else is one sentence."""
    mode = config.get("staging") or "auto"
    if mode not in STAGING_MODES:
        raise InvalidArgument(f"DYNSNAP_STAGING={mode!r} is not one of {', '.join(STAGING_MODES)}", stage="preflight")
    if mode == "tmpfs" and _tmpfs_dir() is None:
        raise InvalidArgument("DYNSNAP_STAGING=tmpfs but there is no writable tmpfs (/dev/shm or $DYNSNAP_TMPFS)",
                              stage="preflight")
    return mode


def _check_extra_manifest(extra: Any) -> None:
    if extra is None:
        return
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise InvalidArgument("extra_manifest must be a dict with string keys", stage="preflight")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"extra_manifest must hold JSON values only: {e}", stage="preflight") from None


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
    from .. import cuda
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
    from ..compat import facts as _facts
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
            from .. import cuda
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
            fault = {"CRIU_FAULT": "3"} if config.test_hook("FAULT") == "dump" else None
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
    """The commit: durable.rename_noreplace, so a snapshot that appeared meanwhile wins."""
    try:
        rename_noreplace(src, dst)
    except FileExistsError:
        raise SnapshotExists(f"{dst} appeared while the snapshot was being written; it was left as it is",
                             stage="commit", path=str(dst)) from None
    except OSError as e:
        raise StorageError(f"cannot commit the snapshot to {dst}: {e.strerror}", stage="commit",
                           path=str(dst), errno=e.errno) from None


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
    from .. import io as dio

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

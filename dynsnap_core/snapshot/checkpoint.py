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
    _check_arguments(out, engine, leave_running, cuda_lock_timeout_ms, extra_manifest)
    staging_mode = staging_setting()
    require_privilege("checkpoint")
    recover()
    proc.validate_target(pid)
    criu = find_criu()
    out = _output_dir(pid, out, log)
    pids = proc.tree(pid)
    tree_lock = TreeLock(pids)         # a second checkpoint of this tree is refused until this one is done
    try:
        _check_tree(pid, pids)
        run = _Checkpoint(pid, pids, out, criu, staging_mode, t_start, leave_running=leave_running,
                          cuda_lock_timeout_ms=cuda_lock_timeout_ms, progress=progress, engine=engine, log=log,
                          extra_manifest=extra_manifest)
        return run.take()
    finally:
        tree_lock.release()


def _check_arguments(out: Any, engine: Any, leave_running: Any, cuda_lock_timeout_ms: Any,
                     extra_manifest: Any) -> None:
    if out is not None:
        _check_path_arg(out, "out")
    _check_engine_arg(engine)
    if not isinstance(leave_running, bool):
        raise InvalidArgument(f"leave_running must be True or False, not {leave_running!r}", stage="preflight")
    if not _is_int(cuda_lock_timeout_ms) or not 0 < cuda_lock_timeout_ms <= 86_400_000:
        raise InvalidArgument(f"cuda_lock_timeout_ms must be a positive number of milliseconds, not "
                              f"{cuda_lock_timeout_ms!r}", stage="preflight")
    _check_extra_manifest(extra_manifest)


def _output_dir(pid: int, out: Any, log: Callable[[str], Any] | None) -> Path:
    """The snapshot directory to create (refused if it exists), its parent created, stale staging there removed."""
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
    return out


def _check_tree(pid: int, pids: list[int]) -> None:
    """Refuse a tree that a debugger traces or that holds what CRIU cannot dump."""
    for p in pids:
        tracer = traced_by(p)
        if tracer:
            raise InvalidTarget(f"cannot checkpoint pid {pid}: pid {p} is traced by pid {tracer} "
                                f"({proc.comm(tracer)}), a debugger or another CRIU; detach it first",
                                stage="preflight", pid=pid)
    problems = proc.unsupported_resources(pids)
    if problems:
        raise InvalidTarget(f"cannot checkpoint pid {pid}: {problems[0]}", stage="preflight", pid=pid)


class _Checkpoint:
    """One checkpoint of a locked tree; ``take()`` runs its phases in order (each a method below)."""

    def __init__(self, pid: int, pids: list[int], out: Path, criu: Any, staging_mode: str, t_start: float, *,
                 leave_running: bool, cuda_lock_timeout_ms: int, progress: Progress, engine: str,
                 log: Callable[[str], Any] | None, extra_manifest: Optional[dict]):
        self.pid, self.pids, self.out, self.parent, self.criu = pid, pids, out, out.parent, criu
        self.staging_mode, self.t_start, self.leave_running = staging_mode, t_start, leave_running
        self.cuda_lock_timeout_ms, self.progress, self.engine, self.log = cuda_lock_timeout_ms, progress, engine, log
        self.extra_manifest = extra_manifest
        self.timings: dict[str, float] = {}
        self.staging = self.parent / f".{out.name}{STAGING_TAG}{os.getpid()}"
        self.dump_dir: Optional[Path] = None
        self.resumer: Optional[_Resumer] = None
        self.cuda_tree: Any = None
        self.gpu: dict = {}
        self.frozen = self.committed = False
        self.sigstate: dict = {}
        self.gms: Any = None            # workers whose in-worker agent quiesced them (GPU memory service regions)

    def take(self) -> Snapshot:
        self.describe()
        self.entry = Entry(self.pids, self.resume)   # on record until the tree's fate is settled (journal.recover)
        self.guardian = Guardian(self.resume, journal=self.entry.path)   # continues the tree if we are killed
        self.entry.guardian(self.guardian.pid)
        self.t_freeze = time.perf_counter()
        try:
            with _deferred_signals(self.sigstate):
                self.quiesce()
                self.gpu_checkpoint()
                self.criu_dump()
                self.persist()
                self.commit(self.manifest())
        except BaseException as e:
            self.roll_back(e)
            raise
        finally:
            self.clean_up()
        return self.finish()

    def describe(self) -> None:
        """What the tree is and what a restoring node must offer, read before anything freezes."""
        pid, pids = self.pid, self.pids
        self.cmd = proc.cmdline(pid)
        self.rss = sum(proc.rss_bytes(p) for p in pids)
        self.shell_job = proc.session_id(pid) != pid
        self.pid_namespace = proc.pid_namespace_init(pid)      # `dynsnap run`: restores into a fresh pid namespace
        self.mount_namespace = proc.mount_namespace(pid) == "own"   # ... and a fresh mount namespace with its /proc
        if self.log and proc.has_tty(pid):
            self.log(f"note: pid {pid} has a terminal on its stdio; its snapshot can only be restored from a "
                     "terminal")
        from ..compat import facts as _facts
        self.compat = _facts.collect(pids, host_rss=self.rss)
        # A process its user stopped (SIGSTOP, Ctrl-Z) stays stopped whatever happens: only the others are continued.
        user_stopped = [p for p in pids if proc.state(p) in ("T", "t")]
        if self.log and user_stopped:
            self.log(f"note: pid(s) {', '.join(map(str, user_stopped))} were stopped before the checkpoint and stay "
                     "stopped")
        self.resume = [p for p in pids if p not in user_stopped]

    def quiesce(self) -> None:
        """Workers that run dynsnap's agent (dynsnap_core/gms/agent.py) pause and release their GPU regions
        (weights mapped from the GPU memory service, KV pools), so none of those bytes enter the image; the
        manifest names the weight sets and their layout hashes instead. No agent in the tree: nothing to do."""
        from ..gms import wiring
        if self.progress:
            self.progress("quiesce", 0, 1)
        self.gms = wiring.before_checkpoint(self.pids)
        if self.gms is not None:
            self.timings.update(wiring.flat_timings(self.gms.timings))

    def gpu_checkpoint(self) -> None:
        """Which processes of the tree use CUDA (the driver says): lock all, then checkpoint all."""
        from .. import cuda
        if not cuda.is_available():
            return
        cpids = cuda.cuda_pids(self.pids)
        if not cpids:
            return
        gpu = self.gpu
        gpu.update(_gpu_facts())
        gpu["pids"] = cpids
        if self.pid_namespace:   # restored with new node pids: found again by their pids inside
            gpu["ns_pids"] = [proc.ns_ids(p)[-1] for p in cpids]
        # per CUDA process: the GPUs it uses (UUID -> bytes), for the manifest and the estimate
        per = {str(p): cuda.process_gpus(p) for p in cpids}
        gpu["processes"] = per
        gpu["memory"] = {p: (None if v is None else sum(v.values())) for p, v in per.items()}
        self.compat["gpu"] = _compat_gpu(gpu)
        if self.log:
            gpu_bytes = sum(v or 0 for v in gpu["memory"].values())
            self.log(f"image estimate: host RSS {self.rss / 2**30:.2f} GiB + GPU {gpu_bytes / 2**30:.2f} GiB "
                     f"in {len(cpids)} CUDA process(es)")
        self.cuda_tree = cuda.CudaTree(cpids, timeout_ms=self.cuda_lock_timeout_ms)
        self.entry.cuda(cpids)
        self.guardian.cuda(cpids)
        if self.progress:
            self.progress("gpu checkpoint", 0, 1)
        self.cuda_tree.lock_all()
        _check_interrupt(self.sigstate, "lock")
        self.cuda_tree.checkpoint_all()
        self.timings.update(self.cuda_tree.timings)
        _check_interrupt(self.sigstate, "gpu checkpoint")

    def criu_dump(self) -> None:
        """CRIU dumps the tree (left stopped) into tmpfs when the image fits there, else into staging."""
        estimate = self.rss + sum(v or 0 for v in self.gpu.get("memory", {}).values())
        self.entry.staging(self.staging)
        dump_root, self.dump_where = choose_dump_dir(self.parent, estimate, self.staging_mode)
        if self.dump_where == "tmpfs":
            self.entry.staging(dump_root)
        if self.dump_where == "target":
            self.staging.mkdir()
            self.dump_dir = self.staging / "criu"
            self.dump_dir.mkdir()
        else:
            self.dump_dir = dump_root
        args = ["dump", "-t", str(self.pid), "-D", str(self.dump_dir), "--leave-stopped", "--file-locks"]
        if self.shell_job:
            args.append("--shell-job")
        if self.mount_namespace:
            args += CRIU_MNTNS_ARGS
        # Test hook: CRIU's own fault injection (FI_DUMP_PAGES) makes a real dump fail half-way.
        fault = {"CRIU_FAULT": "3"} if config.test_hook("FAULT") == "dump" else None
        if self.progress:
            self.progress("criu dump", 0, 1)
        self.frozen = True       # from here on, a failure must resume the tree (CRIU may leave it stopped)
        entry, guardian = self.entry, self.guardian
        self.timings["criu_dump"] = self.criu.run(args, log=self.dump_dir / "dump.log", stage="dump", pid=self.pid,
                                                  env=fault, on_start=lambda c: (entry.criu(c), guardian.criu(c)))
        proc.wait_stopped(self.pids)
        _check_interrupt(self.sigstate, "dump")
        if self.leave_running:
            # The images are complete in staging: the worker goes back to work while they are persisted.
            self.resumer = _Resumer(self.resume, self.cuda_tree, self.t_freeze, self.gms)

    def persist(self) -> None:
        """Stream the images to the target file system with checksums (C engine)."""
        t0 = time.perf_counter()
        self.files, self.engine_used = _persist(self.dump_dir, self.dump_where, self.staging, self.engine,
                                                self.progress, self.sigstate)
        self.timings["persist"] = time.perf_counter() - t0
        _check_interrupt(self.sigstate, "persist")

    def manifest(self) -> dict:
        pid, files = self.pid, self.files
        manifest = {
            "magic": mf.MAGIC, "format": mf.FORMAT_VERSION, "checksum": mf.CHECKSUM,
            "dynsnap_version": _version(), "criu_version": self.criu.version_str,
            "kernel": platform.release(), "host": socket.gethostname(), "arch": platform.machine(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "created_unix": time.time(), "root_pid": pid, "pids": self.pids, "cmdline": self.cmd,
            "comm": proc.comm(pid), "shell_job": self.shell_job, "pid_namespace": self.pid_namespace,
            "mount_namespace": self.mount_namespace, "leave_running": self.leave_running,
            "host_rss_bytes": self.rss, "files": files, "total_bytes": sum(f["size"] for f in files),
            "io_engine": self.engine_used, "dump_staging": self.dump_where, "cuda": self.gpu or None,
            "timings": self.timings, "compat": self.compat,
        }
        if self.gms is not None:
            manifest["gms"] = self.gms.manifest
        for key, value in (self.extra_manifest or {}).items():
            if key in manifest or key == mf.ROOT_KEY:
                raise InvalidArgument(f"extra_manifest may not override {key!r}", stage="preflight")
            manifest[key] = value
        return manifest

    def commit(self, manifest: dict) -> None:
        """manifest.json last, then the staging directory appears under its name at once (never replacing)."""
        self.manifest_ = manifest
        self.timings["total"] = time.perf_counter() - self.t_start
        mf.write(self.staging, manifest)
        _rename_noreplace(self.staging, self.out)
        self.committed = True
        fsync_path(self.parent)

    def roll_back(self, e: BaseException) -> None:
        if isinstance(e, CriuError):
            _keep_log(e)
        if self.resumer is not None:
            self.resumer.wait(raise_errors=False)
        if not self.committed:
            _rollback(self.resume, self.frozen, self.cuda_tree, self.gms)
            shutil.rmtree(self.staging, ignore_errors=True)

    def clean_up(self) -> None:
        if self.dump_dir is not None and not str(self.dump_dir).startswith(str(self.staging)):
            shutil.rmtree(self.dump_dir, ignore_errors=True)
        if not self.committed:
            self.guardian.done()
            self.entry.settle()

    def finish(self) -> Snapshot:
        """The snapshot is durable: the tree is resumed (``leave_running``) or killed."""
        manifest = self.manifest_
        try:
            if self.resumer is not None:
                self.resumer.wait(raise_errors=True)
                manifest["timings"].update(self.resumer.timings)
            else:
                proc.kill_tree(self.pids, signal.SIGKILL)
        finally:
            self.guardian.done()
            self.entry.settle()
        return Snapshot(self.out, manifest)


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

    def __init__(self, pids: list[int], cuda_tree, t_freeze: float, gms: Any = None):
        import threading
        self.timings: dict[str, float] = {}
        self.error: Optional[BaseException] = None
        self._pids, self._cuda, self._t_freeze, self._gms = pids, cuda_tree, t_freeze, gms
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
            if self._gms is not None:       # the agents map their regions back, then serve again
                from ..gms import wiring
                wiring.after_checkpoint(self._gms, kept_running=True)
                self.timings.update(wiring.flat_timings(self._gms.timings))
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


def _rollback(pids: list[int], frozen: bool, cuda_tree, gms: Any = None) -> None:
    """Put the source tree back to running: continue it if we froze it, then CUDA restore + unlock, then the
    quiesced agents map their regions back."""
    if frozen:
        proc.kill_tree(pids, signal.SIGCONT)
    if cuda_tree is not None:
        cuda_tree.rollback()
    if gms is not None:
        from ..gms import wiring
        from ..gms.agent_client import AgentError
        try:
            wiring.after_checkpoint(gms, kept_running=True)
        except AgentError:
            pass                # the checkpoint's own error is the one to report; the agent logs its own


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

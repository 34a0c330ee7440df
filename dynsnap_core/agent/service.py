"""What the agent does, free of HTTP: snapshot, restore, check, list and delete through dynsnap_core's Python API."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import proc
from ..errors import DynsnapError, InvalidTarget, SnapshotExists, SnapshotNotFound
from ..storage import check_name, open_remote
from . import cgroups
from .jobs import Job, JobManager
from .metrics import Metrics

__all__ = ["AgentConfig", "Agent", "Busy", "DEFAULT_SOCKET"]

DEFAULT_SOCKET = "/run/dynsnap/agent.sock"


def _log(line: str) -> None:
    """One line on the agent's stderr (kubectl logs): what each job did; never a credential or token."""
    import sys
    import time
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} dynsnap agent: {line}\n")
    sys.stderr.flush()


class Busy(DynsnapError):
    """A job holds the snapshot or tree the request names."""


@dataclass
class AgentConfig:
    """Where the agent keeps things and how it serves; the defaults match the Helm chart."""

    root: Path = field(default_factory=lambda: _default_root())
    state_dir: Optional[Path] = None             # jobs; default <home>/agent
    cache: Optional[Path] = None                 # downloads from object storage; default <home>/cache/snapshots
    storage: Optional[str] = None                # s3://BUCKET[/PREFIX] or None
    cgroup_root: Path = cgroups.CGROUP_ROOT
    workers: int = 4
    max_body: int = 64 << 10


def _default_root() -> Path:
    from ..snapshot import snapshots_root
    return snapshots_root()


class Agent:
    """The node agent's state: its job manager, metrics and the optional object store."""

    def __init__(self, cfg: AgentConfig):
        from ..snapshot import clean_stale_staging, default_home
        self.cfg = cfg
        self.root = Path(cfg.root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        home = default_home()
        self.cache = Path(cfg.cache or home / "cache" / "snapshots").absolute()
        self.remote = open_remote(cfg.storage)
        clean_stale_staging(self.root)
        if self.cache.is_dir():
            clean_stale_staging(self.cache)
        self.metrics = Metrics(self._stored_counts, lambda: self.jobs.counts())
        self.jobs = JobManager(Path(cfg.state_dir or home / "agent" / "jobs"), workers=cfg.workers,
                               on_finish=self._finished)
        for job in self.jobs.interrupted:       # an earlier agent was killed: say what its jobs left
            self._after_restart(job)

    def _after_restart(self, job: Job) -> None:
        """An earlier agent died during ``job``: its staging is gone (cleaned above), its partial upload is removed
        from the bucket, and the job's message says whether a snapshot was committed before the agent died."""
        from ..snapshot import manifest as mf
        msg = job.error["message"] if job.error else "the agent stopped while this job ran"
        name = job.request.get("name")
        kept = ""
        if job.kind in ("checkpoint", "upload") and name:
            if self.remote is not None:
                self.remote.remove_incomplete(name)
            try:
                mf.read(self.local_path(name))
                kept = name
            except DynsnapError:
                kept = ""
        if kept and job.kind == "checkpoint":
            msg += f"; the snapshot {kept} was committed on this node before that and is complete"
            if job.request.get("upload"):
                msg += " (not uploaded: POST /v1/snapshots/" + kept + "/upload)"
        elif kept:
            msg += f"; the snapshot {kept} on this node is complete (not uploaded)"
        else:
            msg += "; nothing it started was kept"
        self.jobs.amend(job, msg)

    # metrics
    def _stored_counts(self) -> dict:
        from ..snapshot import list_snapshots
        out = {"local": sum(1 for r in list_snapshots(self.root) if r["status"] == "ok")}
        if self.remote is not None:
            try:
                out["remote"] = len(self.remote.list())
            except DynsnapError:
                pass
        return out

    def _finished(self, job: Job) -> None:
        took = (job.finished or 0) - (job.started or job.finished or 0)
        what = f"job {job.id} {job.kind} {job.request.get('name', '')}".rstrip()
        if job.error:
            _log(f"{what}: failed in {took:.2f} s at {job.error.get('stage')}: {job.error.get('message')}")
        else:
            _log(f"{what}: succeeded in {took:.2f} s")
        self.metrics.jobs.labels(job.kind, job.state).inc()
        if job.error:
            self.metrics.failures.labels(job.kind, str(job.error.get("stage") or "unknown")).inc()
        res = job.result or {}
        self.metrics.record_timings(job.kind, res.get("timings") or {})
        if res.get("bytes"):
            self.metrics.bytes.labels(job.kind).inc(res["bytes"])
        if res.get("uploaded_bytes"):
            self.metrics.bytes.labels("upload").inc(res["uploaded_bytes"])
        if res.get("downloaded_bytes"):
            self.metrics.bytes.labels("download").inc(res["downloaded_bytes"])

    # targets
    def resolve_target(self, pid: Optional[int], container: Optional[str], cgroup: Optional[str]) -> tuple[int, str]:
        """(root pid, how it was found) for exactly one of pid / container id / cgroup path."""
        given = [x for x in (pid, container, cgroup) if x is not None]
        if len(given) != 1:
            raise InvalidTarget("give exactly one target: pid, container or cgroup", stage="preflight")
        if pid is not None:
            proc.validate_target(pid)
            return pid, f"pid {pid}"
        if container is not None:
            cg = cgroups.find_container(container, self.cfg.cgroup_root)
        else:
            cg = cgroups.resolve_cgroup(str(cgroup), self.cfg.cgroup_root)
        root = cgroups.tree_root(cg)
        proc.validate_target(root)
        return root, f"cgroup {cg}"

    # snapshots
    def local_path(self, name: str) -> Path:
        return self.root / check_name(name)

    def create(self, *, name: Optional[str], pid: Optional[int], container: Optional[str],
               cgroup: Optional[str], leave_running: bool, upload: Optional[bool]) -> Job:
        root_pid, how = self.resolve_target(pid, container, cgroup)
        if name is None:
            import datetime as _dt
            name = f"{proc.comm(root_pid)}-{root_pid}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip("._") or "snapshot"
        check_name(name)
        out = self.local_path(name)
        if out.exists():
            raise SnapshotExists(f"snapshot {name} already exists on this node", stage="preflight", path=str(out))
        upload = (self.remote is not None) if upload is None else upload
        if upload and self.remote is None:
            raise DynsnapError("upload was asked for but the agent has no object storage (--storage s3://...)",
                               stage="preflight")
        if self.jobs.busy(f"snapshot:{name}"):
            raise Busy(f"a job is already writing or reading snapshot {name}", stage="preflight")
        req = {"name": name, "pid": root_pid, "target": how, "leave_running": leave_running, "upload": upload}

        def run(job: Job) -> dict:
            from ..snapshot import checkpoint
            snap = checkpoint(root_pid, out, leave_running=leave_running,
                              progress=lambda ph, d, t: self.jobs.progress(job, ph, d, t))
            res: dict[str, Any] = {"name": name, "path": str(snap.path), "pid": root_pid,
                                   "bytes": snap.total_bytes, "timings": snap.timings, "uploaded": False}
            if upload:
                self.jobs.progress(job, "upload", 0, 1)
                up = self.remote.upload(snap.path, name, progress=lambda ph, d, t: self.jobs.progress(job, ph, d, t))
                res.update(uploaded=True, url=up["url"], uploaded_bytes=up["bytes"])
            return res
        return self.jobs.submit("checkpoint", [f"tree:{root_pid}", f"snapshot:{name}"], req, run)

    def upload(self, name: str) -> Job:
        """Upload a snapshot of this node to the object store (a retry after a failed upload, or an older one)."""
        from ..snapshot import open_snapshot
        path = self.local_path(name)
        if self.remote is None:
            raise DynsnapError("the agent has no object storage (--storage s3://...)", stage="upload")
        if not path.is_dir():
            raise SnapshotNotFound(f"no snapshot {name} on this node", stage="upload")
        open_snapshot(path)
        if self.jobs.busy(f"snapshot:{name}"):
            raise Busy(f"a job is already writing or reading snapshot {name}", stage="upload")
        if self.remote.exists(name):
            raise SnapshotExists(f"{self.remote.where(name)} already holds a complete snapshot", stage="upload")

        def run(job: Job) -> dict:
            self.jobs.progress(job, "upload", 0, 1)
            up = self.remote.upload(path, name, progress=lambda ph, d, t: self.jobs.progress(job, ph, d, t))
            return {"name": name, "url": up["url"], "uploaded": True, "uploaded_bytes": up["bytes"]}
        return self.jobs.submit("upload", [f"snapshot:{name}"], {"name": name}, run)

    def list(self, location: str = "all") -> list[dict]:
        """Snapshots on this node and (``location="all"``) in object storage; ``local`` never asks the store."""
        from ..snapshot import list_snapshots
        if location not in ("all", "local", "remote"):
            raise DynsnapError(f"location {location!r} is not one of all, local, remote", stage="list")
        rows = {r["name"]: {**r, "location": ["local"]} for r in list_snapshots(self.root)} \
            if location != "remote" else {}
        if self.remote is not None and location != "local":
            for r in self.remote.list():
                if r["name"] in rows:
                    rows[r["name"]]["location"].append("remote")
                    rows[r["name"]]["url"] = r["url"]
                else:
                    rows[r["name"]] = {**r, "status": "ok", "location": ["remote"]}
        return [rows[k] for k in sorted(rows)]

    def describe(self, name: str) -> dict:
        from ..snapshot import open_snapshot
        path = self.local_path(name)
        if path.is_dir():
            snap = open_snapshot(path)
            m = snap.manifest
            where = ["local"] + (["remote"] if self.remote is not None and self.remote.exists(name) else [])
            return {"name": name, "path": str(path), "location": where, "manifest": m}
        if self.remote is not None and self.remote.exists(name):
            return {"name": name, "url": self.remote.where(name), "location": ["remote"],
                    "manifest": self.remote.manifest(name)}
        raise SnapshotNotFound(f"no snapshot {name}", stage="lookup")

    def delete(self, name: str, remote: bool = True) -> dict:
        from ..snapshot import remove
        path = self.local_path(name)
        if self.jobs.busy(f"snapshot:{name}"):
            raise Busy(f"a job is using snapshot {name}; delete it when the job is done", stage="remove")
        removed = []
        if path.is_dir():
            remove(path, force=True)
            removed.append("local")
        cached = self.cache / name
        if cached.is_dir():
            remove(cached, force=True)
        if remote and self.remote is not None and self.remote.remove(name):
            removed.append("remote")
        if not removed:
            raise SnapshotNotFound(f"no snapshot {name}", stage="remove")
        return {"name": name, "removed": removed}

    def _local_or_cached(self, name: str) -> Optional[Path]:
        for p in (self.local_path(name), self.cache / name):
            if p.is_dir():
                return p
        return None

    def check(self, name: str) -> dict:
        from ..compat import check
        from ..snapshot import Snapshot
        path = self._local_or_cached(name)
        if path is not None:
            return check(path).to_dict()
        if self.remote is not None and self.remote.exists(name):
            # not downloaded yet: every fact but the image files, which the download verifies
            m = self.remote.manifest(name)
            rep = check(Snapshot(self.cache / name, m), images=False)
            return rep.to_dict()
        raise SnapshotNotFound(f"no snapshot {name}", stage="check")

    def restore(self, name: str, *, verify: bool = True, device_map: Optional[dict] = None) -> Job:
        check_name(name)
        path = self._local_or_cached(name)
        if path is None and not (self.remote is not None and self.remote.exists(name)):
            raise SnapshotNotFound(f"no snapshot {name}", stage="restore")
        if path is not None:
            from ..snapshot import open_snapshot
            open_snapshot(path)             # a damaged manifest is refused now, not in the job
        req = {"name": name, "verify": verify, "device_map": device_map}

        def run(job: Job) -> dict:
            from ..compat import require
            from ..snapshot import Snapshot, restore
            res: dict[str, Any] = {"name": name}
            where = self._local_or_cached(name)
            if where is None:
                # refuse before downloading anything when the node cannot restore it anyway
                require(Snapshot(self.cache / name, self.remote.manifest(name)), images=False)
                self.jobs.progress(job, "download", 0, 1)
                where = self.remote.download(name, self.cache,
                                             progress=lambda ph, d, t: self.jobs.progress(job, ph, d, t))
                res["downloaded_bytes"] = sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
            r = restore(where, verify=verify, device_map=device_map,
                        progress=lambda ph, d, t: self.jobs.progress(job, ph, d, t))
            res.update(pid=r.pid, path=str(where), timings=r.timings)
            return res
        return self.jobs.submit("restore", [f"snapshot:{name}"], req, run)

    def close(self, timeout: float = 0) -> None:
        """Stop taking jobs and wait up to ``timeout`` seconds for running ones (a checkpoint is never cut)."""
        self.jobs.close(timeout)


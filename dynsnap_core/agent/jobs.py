"""Agent jobs: long work in threads with progress, persisted as JSON, serialized per process tree and snapshot."""
from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import DynsnapError

__all__ = ["Job", "JobManager", "STATES", "TooManyJobs"]

STATES = ("queued", "running", "succeeded", "failed")
MAX_EVENTS = 1000
KEEP = 1000             # finished jobs remembered across restarts


class TooManyJobs(DynsnapError):
    """The queue of waiting jobs is full (the agent stays responsive instead of queueing without bound)."""


@dataclass
class Job:
    """One unit of long work: checkpoint, restore, upload... ``keys`` name what it must hold alone."""

    id: str
    kind: str
    keys: list[str]
    request: dict
    state: str = "queued"
    phase: Optional[str] = None
    done: int = 0
    total: int = 0
    result: Optional[dict] = None
    error: Optional[dict] = None
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    agent_pid: int = field(default_factory=os.getpid)
    events: list[dict] = field(default_factory=list)

    def to_dict(self, events: bool = False) -> dict:
        d = {k: getattr(self, k) for k in ("id", "kind", "state", "phase", "done", "total", "result", "error",
                                           "created", "started", "finished", "request")}
        d["progress"] = {"phase": self.phase, "done": self.done, "total": self.total,
                         "fraction": (self.done / self.total) if self.total else None}
        d["target"] = self.keys
        if events:
            d["events"] = list(self.events)
        return d


class JobManager:
    """Runs jobs on at most ``workers`` threads. A job waits while an earlier job holds any of its keys (the
    same process tree, the same snapshot name); jobs on different trees run at once, in submission order per key.
    Every state change is written to ``state_dir/<id>.json`` (temp file + rename), so a restarted agent knows
    which jobs an earlier agent left unfinished and reports them failed."""

    def __init__(self, state_dir: Path, workers: int = 4, on_finish: Optional[Callable[[Job], None]] = None,
                 max_pending: int = 256):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.workers = max(1, workers)
        self._cv = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._pending: list[tuple[Job, Callable[[Job], dict]]] = []
        self._busy: set[str] = set()
        self._running = 0
        self._on_finish = on_finish
        self.max_pending = max_pending
        self._closed = False
        self.interrupted = self._load()

    # persistence
    def _save(self, job: Job) -> None:
        tmp = self.dir / f".{job.id}.json.tmp"
        data = {**job.to_dict(events=True), "keys": job.keys, "agent_pid": job.agent_pid}
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, self.dir / f"{job.id}.json")

    def _load(self) -> list[Job]:
        """Read earlier jobs; those an earlier agent left queued or running are marked failed (returned).

        Only the newest KEEP finished jobs are kept; older job files are removed.
        """
        lost = []
        files = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in files[:-KEEP]:
            p.unlink(missing_ok=True)
        for p in files[-KEEP:]:
            try:
                d = json.loads(p.read_text())
                job = Job(id=d["id"], kind=d["kind"], keys=d.get("keys") or [], request=d.get("request") or {},
                          state=d["state"], phase=d.get("phase"), done=d.get("done", 0), total=d.get("total", 0),
                          result=d.get("result"), error=d.get("error"), created=d.get("created", 0),
                          started=d.get("started"), finished=d.get("finished"),
                          agent_pid=d.get("agent_pid", 0), events=d.get("events") or [])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if job.state in ("queued", "running"):
                job.error = {"error": "AgentRestarted", "stage": job.phase or job.state,
                             "message": f"the agent stopped while this job was {job.state} (during "
                                        f"{job.phase or 'its start'})"}
                job.state = "failed"
                job.finished = time.time()
                job.events.append({"t": job.finished, "state": "failed", "phase": job.phase,
                                   "message": job.error["message"]})
                self._save(job)
                lost.append(job)
            self._jobs[job.id] = job
        return lost

    def amend(self, job: Job, message: str) -> None:
        """Replace a finished job's error message (the agent says what an interrupted job left) and save it."""
        with self._cv:
            if job.error is not None:
                job.error["message"] = message
                if job.events:
                    job.events[-1]["message"] = message
                self._save(job)

    # public
    def submit(self, kind: str, keys: list[str], request: dict, fn: Callable[[Job], dict]) -> Job:
        job = Job(id=uuid.uuid4().hex, kind=kind, keys=sorted(set(keys)), request=request)
        with self._cv:
            if self._closed:
                raise DynsnapError("the agent is shutting down", stage="agent")
            if len(self._pending) >= self.max_pending:
                raise TooManyJobs(f"{len(self._pending)} jobs are already waiting; try again when some have "
                                  "finished", stage="agent")
            self._jobs[job.id] = job
            job.events.append({"t": job.created, "state": "queued"})
            self._save(job)
            self._pending.append((job, fn))
            self._schedule()
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._cv:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._cv:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def busy(self, key: str) -> bool:
        """A job holds ``key`` now or waits for it."""
        with self._cv:
            return key in self._busy or any(key in j.keys for j, _ in self._pending)

    def counts(self) -> dict:
        with self._cv:
            out = {s: 0 for s in STATES}
            for j in self._jobs.values():
                out[j.state] = out.get(j.state, 0) + 1
            return out

    def progress(self, job: Job, phase: str, done: int, total: int) -> None:
        with self._cv:
            new_phase = phase != job.phase
            job.phase, job.done, job.total = phase, int(done), int(total)
            ev = {"t": time.time(), "state": job.state, "phase": phase, "done": job.done, "total": job.total}
            if new_phase or not job.events or job.events[-1].get("phase") != phase:
                job.events.append(ev)
                self._save(job)
            else:
                job.events[-1] = ev        # one event per phase, updated in place
            if len(job.events) > MAX_EVENTS:
                del job.events[1:len(job.events) - MAX_EVENTS]
            self._cv.notify_all()

    def wait_change(self, job: Job, seen: tuple, timeout: float) -> tuple:
        """Block until the job's (state, phase, done, events) differs from ``seen`` or ``timeout``; the new value."""
        with self._cv:
            self._cv.wait_for(lambda: self.signature(job) != seen or self._closed, timeout=timeout)
            return self.signature(job)

    @staticmethod
    def signature(job: Job) -> tuple:
        """What changes when a job makes progress: (state, phase, done, number of events)."""
        return (job.state, job.phase, job.done, len(job.events))

    def close(self, timeout: float = 0) -> None:
        """Take no more jobs; fail the queued ones; wait up to ``timeout`` seconds for the running ones."""
        with self._cv:
            self._closed = True
            for job, _ in self._pending:
                job.state, job.finished = "failed", time.time()
                job.error = {"error": "AgentStopped", "stage": "queued",
                             "message": "the agent stopped before this job started; nothing was done"}
                job.events.append({"t": job.finished, "state": "failed", "message": job.error["message"]})
                self._save(job)
            self._pending.clear()
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._running == 0, timeout=timeout)

    # scheduling
    def _schedule(self) -> None:
        """Start pending jobs whose keys are free, in order; called with the lock held."""
        claimed: set[str] = set()
        for item in list(self._pending):
            job, fn = item
            free = not (set(job.keys) & (self._busy | claimed))
            claimed |= set(job.keys)          # later jobs on the same key wait for this one
            if free and self._running < self.workers:
                self._pending.remove(item)
                self._busy |= set(job.keys)
                self._running += 1
                threading.Thread(target=self._run, args=(job, fn), name=f"dynsnap-job-{job.id[:8]}",
                                 daemon=True).start()

    def _run(self, job: Job, fn: Callable[[Job], dict]) -> None:
        with self._cv:
            job.state, job.started = "running", time.time()
            job.events.append({"t": job.started, "state": "running"})
            self._save(job)
            self._cv.notify_all()
        result: Optional[dict] = None
        error: Optional[dict] = None
        try:
            result = fn(job)
        except DynsnapError as e:
            error = e.to_dict()
        except Exception as e:  # noqa: BLE001 - a bug must not kill the agent: report it on the job
            error = {"error": type(e).__name__, "message": f"internal error: {e}", "stage": job.phase,
                     "traceback": traceback.format_exc(limit=5)}
        with self._cv:
            job.finished = time.time()
            job.result, job.error = result, error
            job.state = "failed" if error else "succeeded"
            job.events.append({"t": job.finished, "state": job.state, "phase": job.phase,
                               **({"message": error.get("message")} if error else {})})
            self._save(job)
            self._busy -= set(job.keys)
            self._running -= 1
            self._schedule()
            self._cv.notify_all()
        if self._on_finish is not None:
            try:
                self._on_finish(job)
            except Exception:  # noqa: BLE001 - metrics must not break jobs
                pass

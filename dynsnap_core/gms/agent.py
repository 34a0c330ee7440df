"""The in-worker agent: quiesce before a checkpoint, resume after a restore.

    from dynsnap_core.gms import agent
    agent.register(quiesce=engine.pause, resume=engine.unpause)   # optional engine callbacks
    agent.start()                                                  # a daemon thread on an abstract socket

The agent listens on the ABSTRACT Unix socket ``dynsnap-agent-<pid>-<16 hex>`` (not a path: dynsnap's
restore renames abstract names that are taken on the node, so side-by-side copies of a snapshot work; the
pid stays in the kept head of the name) and writes ``{pid, name, start_time}`` to
``$DYNSNAP_RUN_DIR/agents/<pid>.json`` (``/run/dynsnap/agents``) so ``agent_client.find`` can find it.

Per request: connect, send one message (the service's framing: 4-byte length + JSON)
``{"op": "quiesce" | "resume" | "ping"}``; the agent runs the work and replies ``{"ok": true, "timings":
{...}}`` or ``{"ok": false, "error": SENTENCE}``, then closes its side at once: the client reads the reply,
then waits for EOF, so no connected socket is left in the worker when CRIU freezes it.

quiesce: engine quiesce callbacks (in registration order: drain, pause), synchronize the GPU, release every
region (weights, private), synchronize. resume: reacquire every region (in creation order), then the engine
resume callbacks (in reverse order). A failed quiesce resumes what it released and reports the error.

Process-wide state: one agent per process (the default :class:`Agent`), which holds the regions of this
process (strong references: regions live as long as the process, and one that is dropped while mapped must
still be released before a snapshot).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Optional

from .. import config
from ..once import once
from . import protocol as P

__all__ = ["Agent", "default", "start", "register", "track", "run_dir", "agent_file", "PREFIX"]

PREFIX = "dynsnap-agent-"


def run_dir() -> str:
    return os.fspath(config.run_dir())


def agent_file(pid: int) -> str:
    return os.path.join(run_dir(), "agents", f"{int(pid)}.json")


def _start_time(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Agent:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._regions: dict[int, Any] = {}      # strong: a region dropped but still mapped must still be released
        self._order = 0
        self._callbacks: list[tuple[Optional[Callable[[], Any]], Optional[Callable[[], Any]]]] = []
        self.name: Optional[str] = None
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self.state = "running"
        self.last: dict = {}

    # ---- registration ----
    def register(self, quiesce: Optional[Callable[[], Any]] = None, resume: Optional[Callable[[], Any]] = None) -> None:
        """Engine callbacks: ``quiesce`` runs before the regions are released, ``resume`` after they are back."""
        with self._lock:
            self._callbacks.append((quiesce, resume))

    def track(self, region: Any) -> None:
        """A region (anything with release()/reacquire()) to release on quiesce and reacquire on resume."""
        with self._lock:
            self._order += 1
            self._regions[self._order] = region

    def untrack(self, region: Any) -> None:
        """Stop managing a region (after its owner released it for good)."""
        with self._lock:
            for k in [k for k, r in self._regions.items() if r is region]:
                del self._regions[k]

    def regions(self) -> list:
        with self._lock:
            return [self._regions[k] for k in sorted(self._regions)]

    # ---- the work ----
    def quiesce(self) -> dict:
        """Engine callbacks (drain, pause), then release every region. A second quiesce is a no-op."""
        with self._lock:
            if self.state == "quiesced":
                return {"total_s": 0.0, "regions": 0, "already": True}
            self.state = "quiescing"        # a quiesce that fails half-way is undone by resume
            t = {}
            t0 = time.perf_counter()
            for q, _r in self._callbacks:
                if q is not None:
                    q()
            t["callbacks_s"] = time.perf_counter() - t0
            regs = self.regions()
            if regs:
                _sync(regs)
            t1 = time.perf_counter()
            done = []
            try:
                for r in regs:
                    r.release()
                    done.append(r)
            except BaseException:
                for r in reversed(done):
                    try:
                        r.reacquire()
                    except Exception:  # noqa: BLE001 - the original error is what matters
                        pass
                raise
            t["release_s"] = time.perf_counter() - t1
            if regs:
                _sync(regs)
            t["total_s"] = time.perf_counter() - t0
            t["regions"] = len(regs)
            self.state = "quiesced"
            return t

    def resume(self) -> dict:
        """Reacquire every region, then the engine callbacks (in reverse). Resuming a running worker is a no-op."""
        with self._lock:
            if self.state == "running":
                return {"total_s": 0.0, "already": True}
            t = {}
            t0 = time.perf_counter()
            for r in self.regions():
                r.reacquire()
            t["reacquire_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _q, r in reversed(self._callbacks):
                if r is not None:
                    r()
            t["callbacks_s"] = time.perf_counter() - t1
            t["total_s"] = time.perf_counter() - t0
            self.state = "running"
            return t

    def manifest_entry(self) -> dict:
        """What a snapshot's manifest records about this worker: the agent's socket name, the service socket(s)
        and the weight sets with their layout hashes (never their bytes)."""
        sets, services = [], set()
        for r in self.regions():
            info = r.info() if hasattr(r, "info") else {}
            if info.get("kind") == "weights":
                sets.append({"set": info["set"], "layout_hash": info["layout_hash"], "bytes": info["size"],
                             "va": info["va"], "service": info["service"]})
                services.add(info["service"])
        return {"agent": self.name, "pid": os.getpid(), "weight_sets": sets, "service_sockets": sorted(services),
                "private_bytes": sum(r.size for r in self.regions() if getattr(r, "info", lambda: {})().get(
                    "kind") == "private")}

    # ---- the socket ----
    def start(self) -> str:
        """Listen (idempotent); returns the abstract name (without the leading NUL)."""
        with self._lock:
            if self._thread is not None:
                assert self.name is not None
                return self.name
            pid = os.getpid()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            for _ in range(16):
                name = f"{PREFIX}{pid}-{secrets.token_hex(8)}"
                try:
                    s.bind("\0" + name)
                    break
                except OSError:
                    continue
            else:
                s.close()
                raise OSError("no free abstract socket name for the dynsnap agent")
            s.listen(8)
            self._sock, self.name = s, name
            self._write_file()
            self._thread = threading.Thread(target=self._serve, daemon=True, name="dynsnap-agent")
            self._thread.start()
            return name

    def _write_file(self) -> None:
        path = agent_file(os.getpid())
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "name": self.name, "start_time": _start_time(os.getpid())}, f)
            os.replace(tmp, path)
        except OSError:
            pass           # find() also scans /proc/net/unix for the name

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                self._one(conn)
            finally:
                conn.close()      # close, not shutdown: the fd leaves this process before the client sees EOF

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            req, fds = P.recv(conn, 4096)
        except (OSError, ConnectionError, P.ProtocolError) as e:
            _try_send(conn, {"ok": False, "error": f"malformed agent request: {e}"})
            P.drain(conn)
            return
        P._close_all(fds)
        op = req.get("op") if isinstance(req, dict) else None
        try:
            if op == "ping":
                rep = {"ok": True, "pid": os.getpid(), "state": self.state, "regions": len(self.regions())}
            elif op == "quiesce":
                rep = {"ok": True, "timings": self.quiesce()}
            elif op == "resume":
                rep = {"ok": True, "timings": self.resume()}
            elif op == "manifest":
                rep = {"ok": True, "entry": self.manifest_entry()}
            else:
                rep = {"ok": False, "error": f"unknown agent request {op!r} (ping, quiesce, resume, manifest)"}
        except Exception as e:  # noqa: BLE001 - reported to the caller, the worker keeps running
            rep = {"ok": False, "error": f"{op} failed in pid {os.getpid()}: {type(e).__name__}: {e}"}
        self.last = rep
        _try_send(conn, rep)


def _try_send(conn: socket.socket, obj: dict) -> None:
    try:
        P.send(conn, obj)
    except OSError:
        pass


def _sync(regs: list) -> None:
    from . import vmm
    for dev in sorted({getattr(r, "device", 0) for r in regs}):
        vmm.synchronize(dev)


@once
def default() -> Agent:
    """This process's agent (created on first use; started by :func:`start`)."""
    return Agent()


def start() -> str:
    return default().start()


def register(quiesce: Optional[Callable[[], Any]] = None, resume: Optional[Callable[[], Any]] = None) -> None:
    default().register(quiesce=quiesce, resume=resume)


def track(region: Any) -> None:
    default().track(region)


def manifest_entry() -> dict:
    return default().manifest_entry()
